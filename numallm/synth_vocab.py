"""Small tokenizer vocabularies for synthetic GGUFs (numallm.synth): a byte-level BPE learned
from a tiny corpus (llama-bpe / qwen2 style, with chat templates) and a SentencePiece-style one,
so synthetic models tokenize real text like the models they imitate.
"""
from __future__ import annotations

import re
from typing import Any

_CORPUS = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her friends. One day, she saw a big red ball under the tree and wanted to play "
    "with it. The sun was shining and the birds were singing. Her mother said that they would "
    "go to the park again in the morning. The model reads the text, then it writes the next "
    "token, and then the next one. Numbers like 12, 345 and 2024 are split into digits. "
    "What is the capital of France? The capital of France is Paris. Hello, world! "
)
_WORD = re.compile(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE token text)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _learn_merges(n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on _CORPUS (pairs never cross pre-tokenizer word boundaries)."""
    b2u = _bytes_to_unicode()
    words: dict[tuple[str, ...], int] = {}
    for w in _WORD.findall(_CORPUS):
        key = tuple(b2u[b] for b in w.encode())
        words[key] = words.get(key, 0) + 1
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        counts: dict[tuple[str, str], int] = {}
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + c
        if not counts:
            break
        best = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]  # ties: deterministic
        if counts[best] < 2:
            break
        merges.append(best)
        new_words: dict[tuple[str, ...], int] = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
_CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_ZEPHYR_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# GGUF token types
_NORMAL, _UNKNOWN, _CONTROL, _UNUSED, _BYTE = 1, 2, 3, 5, 6


def _bpe_vocab(arch: str, n_vocab: int) -> dict[str, Any]:
    """gpt2-style byte-level BPE: ids 0..255 are the bytes, then merges, specials, padding."""
    if arch == "llama":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eot_id|>"]
        pre, template, bos, eos, add_bos = "llama-bpe", _LLAMA3_TEMPLATE, 0, 4, True
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        pre, template, bos, eos, add_bos = "qwen2", _CHATML_TEMPLATE, 0, 2, False
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    room = n_vocab - 256 - len(specials)
    if room < 0:
        raise ValueError(f"vocab {n_vocab} is too small for a byte-level vocab (needs "
                         f"{256 + len(specials)})")
    merges = _learn_merges(min(room, 400))
    tokens += [a + b for a, b in merges]
    types = [_NORMAL] * len(tokens)
    special_ids = {s: len(tokens) + i for i, s in enumerate(specials)}
    tokens += specials
    types += [_CONTROL] * len(specials)
    pad = n_vocab - len(tokens)
    tokens += [f"<unused_{i}>" for i in range(pad)]   # pure ASCII: valid byte-level text
    types += [_UNUSED] * pad
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types,
            "merges": [f"{a} {b}" for a, b in merges], "scores": None,
            "bos": special_ids[specials[bos]], "eos": special_ids[specials[eos]],
            "add_bos": add_bos, "template": template}


def _spm_vocab(n_vocab: int) -> dict[str, Any]:
    """llama (SentencePiece) vocab: <unk> <s> </s>, 256 byte tokens, then scored pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256
    scores = [0.0] * len(tokens)
    chars = sorted({c for c in _CORPUS.replace(" ", "\u2581")})
    pieces = list(chars)
    for a, b in _learn_merges(400):
        p = (a + b).replace("\u0120", "\u2581")
        if all(ord(c) < 128 or c == "\u2581" for c in p) and p not in pieces:
            pieces.append(p)
    pieces = pieces[:max(0, n_vocab - len(tokens))]
    # SPM merges by score: later (longer, rarer) pieces score lower, single chars highest
    scores += [-float(i) for i in range(len(pieces))]
    tokens += pieces
    types += [_NORMAL] * len(pieces)
    pad = n_vocab - len(tokens)
    if pad < 0:
        raise ValueError(f"vocab {n_vocab} is too small for an SPM vocab (needs {len(tokens)})")
    tokens += [f"<unused_{i}>" for i in range(pad)]
    types += [_UNUSED] * pad
    scores += [-1e4] * pad
    return {"model": "llama", "pre": None, "tokens": tokens, "types": types, "merges": None,
            "scores": scores, "bos": 1, "eos": 2, "add_bos": True, "template": _ZEPHYR_TEMPLATE}


# -- weights ---------------------------------------------------------------------------------
