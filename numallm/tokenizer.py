"""Tokenizer built from GGUF metadata that reproduces llama.cpp's (llama-vocab.cpp) behaviour.

Kinds (`tokenizer.ggml.model`):
  llama  SentencePiece-style (SPM): hand-written here, it is short. Spaces become U+2581, a space
         is prefixed, then score-driven bigram merges over UTF-8 characters (highest score first,
         leftmost on ties); leftover characters fall back to <0xXX> byte tokens, then to unk.
  gpt2   byte-level BPE. The HuggingFace `tokenizers` library (Rust) does the pre-tokenizer
         splitting (a Sequence of Split(Regex, "isolated") + ByteLevel without its own regex) and
         the rank-ordered merging (models.BPE, `ignore_merges` for llama3-style vocabs): it is
         fast and is what produced the reference token ids that llama.cpp itself is tested
         against. The split regexes per `tokenizer.ggml.pre` (tokenizer_tables.py) are the
         models' own pre-tokenizer patterns; Oniguruma runs them unchanged. Decoding is ours.
  bert   WordPiece (WPM), hand-written like llama.cpp: crude NFD (first code point of each
         decomposition), lowercase, split on whitespace/punctuation/CJK, greedy longest match.

Special tokens are cut out of the raw text first (longest token text first), as llama.cpp does:
control/unknown tokens only when parse_special=True; user-defined tokens (type 4) always, because
the reference tokenizers match them unconditionally (e.g. deepseek-coder's "ü" token 32009).
Decoding follows llama.cpp's detokenize: the SPM prefix space is dropped from the first piece,
control tokens show as their text unless skip_special, and BPE/WPM vocabs get llama.cpp's
`clean_spaces` pass (" ," -> ","...). Streaming (StreamDecoder) emits raw pieces, like llama.cpp's
generation loop, holding back bytes of an incomplete UTF-8 character.
"""
from __future__ import annotations

import heapq
import json
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Regex, Tokenizer as _HFTokenizer, models as _hf_models
from tokenizers import pre_tokenizers as _hf_pre

from .errors import GGUFError, NumallmError, UnsupportedError
from .tokenizer_text import clean_spaces as _clean_spaces
from .tokenizer_text import complete_prefix_len as _complete_prefix_len
from .tokenizer_text import wpm_words as _wpm_words
from .tokenizer_tables import (ADD_BOS_PRE, DEPRECATED_FIM, DETECT, EOG_TEXTS, IGNORE_MERGES,
                               KEEP_SPACES_PRE, PRE_REGEXES)

__all__ = ["Tokenizer", "StreamDecoder"]

# GGUF token types (llama.h LLAMA_TOKEN_TYPE_*)
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)

SUPPORTED_MODELS = ("llama", "gpt2", "bert")
_WS_ESC = "\u2581"  # SentencePiece's visible space
_C_SPACE = " \t\n\v\f\r"  # C isspace(), used by the strip attributes of special tokens

# GPT-2's reversible byte <-> printable character table of byte-level BPE vocabs: printable
# Latin-1 bytes stand for themselves, the others map to U+0100 onwards in byte order.
_PRINTABLE = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
_OTHER = [b for b in range(256) if b not in _PRINTABLE]
_CHAR_TO_BYTE = {**{chr(b): b for b in _PRINTABLE},
                 **{chr(256 + k): b for k, b in enumerate(_OTHER)}}


def _text_bytes(s: str) -> bytes:
    return s.encode("utf-8", errors="surrogateescape")


def _has_surrogate(s: str) -> bool:
    """Lone surrogates (undecodable bytes) are not UTF-8; they cannot be tokenized or passed on."""
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


class StreamDecoder:
    """Incremental detokenizer: push(id) returns only complete UTF-8 text, flush() the rest."""

    def __init__(self, tok: "Tokenizer", skip_special: bool = True):
        self._tok = tok
        self._skip = skip_special
        self._buf = bytearray()  # undecoded tail: at most the first bytes of one character

    def push(self, token_id: int) -> str:
        self._buf += self._tok._piece(int(token_id), not self._skip)
        cut = _complete_prefix_len(self._buf)
        out = bytes(self._buf[:cut]).decode("utf-8", errors="replace")
        del self._buf[:cut]
        return out

    def flush(self) -> str:
        out = bytes(self._buf).decode("utf-8", errors="replace")
        self._buf.clear()
        return out


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary (see module docstring)."""

    def __init__(self, meta: dict, default_specials: bool = True):
        kind = meta.get("tokenizer.ggml.model")
        if kind not in SUPPORTED_MODELS:
            raise UnsupportedError(
                f"tokenizer.ggml.model={kind!r} is not supported; numallm supports "
                f"{', '.join(SUPPORTED_MODELS)} (SentencePiece, byte-level BPE, WordPiece) vocabs")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise GGUFError("tokenizer.ggml.tokens is missing or empty; the model has no usable "
                            "vocabulary (re-convert it with llama.cpp's convert_hf_to_gguf.py)")
        n = len(tokens)
        self.kind: str = kind
        self.vocab_size: int = n
        self.pre: str = str(meta.get("tokenizer.ggml.pre", "default" if kind == "gpt2" else ""))
        self._texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self._ids = {t: i for i, t in enumerate(self._texts)}  # later duplicates win, as llama.cpp
        self._scores = self._array(meta, "tokenizer.ggml.scores", n, np.float32, 0.0).tolist()
        types = self._array(meta, "tokenizer.ggml.token_type", n, np.int32, NORMAL)
        self._types = bytearray(np.clip(types, 0, 255).astype(np.uint8).tobytes())
        self._pieces: list[bytes | None] = [None] * n  # token_to_piece cache, filled lazily

        # defaults per kind (llama.cpp), then metadata overrides
        self.add_space_prefix = kind == "llama"
        self._clean_spaces = kind != "llama"
        ids = dict(bos=None, eos=None, unk=None, sep=None)
        if kind == "llama":
            ids.update(bos=1, eos=2, unk=0)
            add_bos, add_eos = True, False
        elif kind == "bert":
            ids.update(bos=101, unk=100, sep=102)
            add_bos, add_eos = True, False
        else:
            if self.pre not in PRE_REGEXES:
                raise UnsupportedError(
                    f"tokenizer.ggml.pre={self.pre!r} is not supported; known pre-tokenizers: "
                    f"{', '.join(sorted(k for k in PRE_REGEXES if k))}")
            ids.update(bos=11, eos=11)
            add_bos, add_eos = self.pre in ADD_BOS_PRE, False
            if self.pre in KEEP_SPACES_PRE:
                self._clean_spaces = False
            if self.pre == "chatglm-bpe":
                ids["bos"] = None
        if not default_specials:
            ids = dict.fromkeys(ids)
        self.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix",
                                              self.add_space_prefix))
        for name, key in dict(bos="bos", eos="eos", unk="unknown", sep="seperator").items():
            v = meta.get(f"tokenizer.ggml.{key}_token_id")
            if isinstance(v, (int, np.integer)) and 0 <= int(v) < n:
                ids[name] = int(v)  # out-of-range ids (e.g. 2**32-1 for "none") keep the default
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", add_eos))
        self.bos_id: int | None = ids["bos"]
        self.eos_id: int | None = ids["eos"]
        self.unk_id: int | None = ids["unk"]
        self.sep_id: int | None = ids["sep"]
        self.add_bos: bool = add_bos and self.bos_id is not None
        self.add_eos: bool = add_eos and self.eos_id is not None
        self.eot_ids: frozenset[int] = self._find_eog(meta)
        self._rstrip = self._rstrip_ids(meta)
        # special-token candidates for the input text, longest text first
        kinds = np.frombuffer(self._types, dtype=np.uint8)
        cand = np.flatnonzero(np.isin(kinds, (CONTROL, USER_DEFINED, UNKNOWN))).tolist()
        self._special_order = sorted(cand, key=lambda i: -len(_text_bytes(self._texts[i])))
        self._max_len = max(map(len, self._texts)) if kind == "bert" else 0
        self._hf = self._build_bpe(meta) if kind == "gpt2" else None

    # -- construction helpers ----------------------------------------------------------------
    @staticmethod
    def _array(meta: dict, key: str, n: int, dtype, default) -> np.ndarray:
        v = meta.get(key)
        if v is None:
            return np.full(n, default, dtype=dtype)
        arr = np.asarray(v)
        if arr.ndim != 1 or len(arr) != n or not np.issubdtype(arr.dtype, np.number):
            raise GGUFError(f"{key} has {arr.size} entries for {n} tokens; the model file is "
                            f"corrupt (re-convert it)")
        return arr.astype(dtype)

    def _find_eog(self, meta: dict) -> frozenset[int]:
        """End-of-generation ids, found the way llama.cpp does (ids from keys, else by text)."""
        n, found = self.vocab_size, {}
        for name, texts in DETECT.items():
            keys = [f"tokenizer.ggml.{name}_token_id"]
            if name in DEPRECATED_FIM:
                keys.append(f"tokenizer.ggml.{DEPRECATED_FIM[name]}_token_id")
            for key in keys:
                v = meta.get(key)
                if isinstance(v, (int, np.integer)) and 0 <= int(v) < n:
                    found[name] = int(v)
            present = [t for t in texts if t in self._ids]
            if name not in found and present:
                hit = self._ids[min(present)]  # llama.cpp walks a std::map: smallest text wins
                found[name] = hit
                self._types[hit] = CONTROL  # llama.cpp overrides mis-typed ones
        eog = {found[k] for k in ("fim_pad", "fim_rep", "fim_sep", "eot", "eom") if k in found}
        for t in EOG_TEXTS:
            i = self._ids.get(t)
            if i is not None:
                eog.add(i)
                self._types[i] = CONTROL
        if self.eos_id is not None:
            eog.add(self.eos_id)
        return frozenset(eog)

    def _rstrip_ids(self, meta: dict) -> set[int]:
        """Phi-3 strips whitespace right of its special tokens (llama.cpp sets it by name)."""
        name = str(meta.get("general.name", "")).lower()
        if "phi-3" not in name and "phi3" not in name:
            return set()
        rstrip = {i for i in range(self.vocab_size)
                  if self._types[i] in (CONTROL, USER_DEFINED, UNKNOWN)}
        rstrip |= {self._ids[t] for t in ("</s>",) if t in self._ids}
        rstrip -= {self._ids[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in self._ids}
        return rstrip

    def _build_bpe(self, meta: dict) -> _HFTokenizer:
        merges = meta.get("tokenizer.ggml.merges")
        if not isinstance(merges, list):
            raise GGUFError("tokenizer.ggml.merges is missing; a gpt2 (BPE) vocabulary needs it "
                            "(re-convert the model with llama.cpp's convert_hf_to_gguf.py)")
        vocab = self._ids
        if _has_surrogate("".join(vocab)):  # non-UTF-8 token texts cannot cross into Rust
            vocab = {t: i for t, i in vocab.items() if not _has_surrogate(t)}
        # `tokenizers` panics on merges whose parts or result are not tokens: skip those
        split = (m.partition(" ") for m in merges)
        pairs = [(a, b) for a, _, b in split if a in vocab and b in vocab and a + b in vocab]
        model = _hf_models.BPE(vocab=vocab, merges=pairs,
                               ignore_merges=self.pre in IGNORE_MERGES)
        hf = _HFTokenizer(model)
        splits = [_hf_pre.Split(Regex(r), behavior="isolated") for r in PRE_REGEXES[self.pre]]
        splits.append(_hf_pre.ByteLevel(add_prefix_space=False, use_regex=False))
        hf.pre_tokenizer = _hf_pre.Sequence(splits)
        return hf

    @classmethod
    def from_metadata(cls, meta: dict) -> "Tokenizer":
        """Build from GGUFFile(path).metadata."""
        return cls(meta)

    @classmethod
    def from_bpe_files(cls, encoder_json: str | Path, vocab_bpe: str | Path,
                       pre: str = "llama-bpe") -> "Tokenizer":
        """Byte-level BPE from GPT-2 style files (encoder.json + vocab.bpe); no special tokens."""
        with open(encoder_json, encoding="utf-8") as f:
            enc = json.load(f)
        tokens = [""] * len(enc)
        for t, i in enc.items():
            if not isinstance(i, int) or not 0 <= i < len(enc) or tokens[i]:
                raise NumallmError(f"{encoder_json}: token ids are not 0..{len(enc) - 1} without "
                                   f"gaps; give a GPT-2 style encoder.json")
            tokens[i] = t
        with open(vocab_bpe, encoding="utf-8") as f:
            merges = [ln.rstrip("\n") for ln in f if ln.strip() and not ln.startswith("#version")]
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges}
        return cls(meta, default_specials=False)

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        out: list[int] = []
        if _has_surrogate(text):
            text = text.encode("utf-8", errors="replace").decode("utf-8")
        frags = self._partition(text, parse_special) if text else []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        if self.kind == "llama":
            prev_special = True  # the text right after BOS/a special token gets the space prefix
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                    prev_special = True
                else:
                    s = " " + f if self.add_space_prefix and prev_special else f
                    self._spm(s.replace(" ", _WS_ESC), out)
                    prev_special = False
        else:
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                elif self.kind == "gpt2":
                    out.extend(self._hf.encode(f, add_special_tokens=False).ids)
                else:
                    self._wpm(f, out)
        if add_special:
            if self.kind == "bert":
                if self.sep_id is not None:
                    out.append(self.sep_id)
            elif self.add_eos:
                out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special-token texts out of `text` (longest first): a list of str and ids."""
        frags: list[str | int] = [text]
        for tid in self._special_order:
            if not parse_special and self._types[tid] != USER_DEFINED:
                continue
            tt = self._texts[tid]
            if tt not in text:
                continue
            new: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tt not in f:
                    new.append(f)
                    continue
                parts = f.split(tt)
                for k, p in enumerate(parts):
                    if k and tid in self._rstrip:
                        p = p.lstrip(_C_SPACE)
                    if k:
                        new.append(tid)
                    if p:
                        new.append(p)
            frags = new
        return frags

    def _spm(self, text: str, out: list[int]) -> None:
        """SentencePiece-style merging of `text` (spaces already escaped) into `out`."""
        n = len(text)
        if n == 0:
            return
        start = list(range(n))      # (n,) first char of each symbol
        size = [1] * n              # (n,) chars in each symbol, 0 once merged away
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        ids, scores, heap = self._ids, self._scores, []

        def add_bigram(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            piece = text[start[left]:start[left] + size[left] + size[right]]
            tid = ids.get(piece)
            if tid is not None:
                # highest score first, then leftmost
                heapq.heappush(heap, (-scores[tid], left, right, len(piece)))

        for i in range(1, n):
            add_bigram(i - 1, i)
        while heap:
            _, left, right, length = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != length:
                continue  # stale: one side was merged since this bigram was queued
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add_bigram(prev[left], left)
            add_bigram(left, nxt[left])
        i = 0
        while i != -1:
            piece = text[start[i]:start[i] + size[i]]
            tid = ids.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                for b in piece.encode("utf-8"):
                    out.append(self._byte_token(b))
            i = nxt[i]

    def _byte_token(self, b: int) -> int:
        tid = self._ids.get(f"<0x{b:02X}>")
        if tid is None:
            tid = self._ids.get(chr(b)) if b < 0x80 else None
        if tid is None:
            if self.unk_id is None:
                raise UnsupportedError(f"the vocabulary has no byte token <0x{b:02X}> and no "
                                       f"unknown token; this SPM model cannot encode that text")
            tid = self.unk_id
        return tid

    def _wpm(self, text: str, out: list[int]) -> None:
        """WordPiece: greedy longest match per word, "\u2581" marks a word start."""
        for word in _wpm_words(text):
            w = _WS_ESC + word
            n, mark, i = len(w), len(out), 0
            while i < n:
                for j in range(min(n, i + self._max_len + 1), i, -1):
                    tid = self._ids.get(w[i:j])
                    if tid is not None:
                        out.append(tid)
                        i = j
                        break
                else:  # no piece fits: the whole word is unknown
                    del out[mark:]
                    break
            if len(out) == mark and self.unk_id is not None:
                out.append(self.unk_id)

    # -- decoding ----------------------------------------------------------------------------
    def _piece(self, tid: int, special: bool) -> bytes:
        if not 0 <= tid < self.vocab_size:
            raise ValueError(f"token id {tid} is outside the vocabulary (0..{self.vocab_size - 1})")
        ty = self._types[tid]
        if ty in (CONTROL, UNKNOWN):
            return _text_bytes(self._texts[tid]) if special else b""
        p = self._pieces[tid]
        if p is None:
            text = self._texts[tid]
            if ty == USER_DEFINED:
                p = _text_bytes(text)
            elif ty == NORMAL and self.kind == "gpt2":
                p = b"".join(bytes((_CHAR_TO_BYTE[c],)) if c in _CHAR_TO_BYTE else _text_bytes(c)
                             for c in text)
            elif ty == NORMAL:
                p = _text_bytes(text.replace(_WS_ESC, " "))
            elif ty == BYTE and self.kind != "gpt2" and len(text) == 6 and text.startswith("<0x"):
                p = bytes((int(text[3:5], 16),))
            else:
                p = b""  # unused/undefined tokens print nothing (llama.cpp)
            self._pieces[tid] = p
        return p

    def is_control(self, id: int) -> bool:
        """A control or unknown token (BOS, EOS, <|im_end|>...): no text of its own."""
        return self._types[int(id)] in (CONTROL, UNKNOWN)

    def encode_continuation(self, text: str) -> list[int]:
        """Tokens of `text` as it goes on after earlier text: no BOS/EOS and no SentencePiece
        space prefix (what a grammar matcher needs to turn forced bytes into tokens)."""
        if self.kind != "llama":
            return self.encode(text, add_special=False)
        out: list[int] = []
        self._spm(text.replace(" ", _WS_ESC), out)
        return out

    def token_to_piece(self, id: int) -> bytes:
        """Raw bytes of one token; control tokens give their text, byte tokens their byte."""
        return self._piece(int(id), True)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """llama.cpp's detokenize; invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        remove_space = self.add_space_prefix
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if skip_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        parts = []
        for tid in ids:
            p = self._piece(tid, not skip_special)
            if remove_space and p[:1] == b" ":
                p = p[1:]
            remove_space = False
            parts.append(p)
        data = b"".join(parts)
        if self._clean_spaces:
            data = _clean_spaces(data)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}, pre={self.pre!r}, {self.vocab_size} tokens, "
                f"bos={self.bos_id}, eos={self.eos_id})")
