"""Tokenizer vs llama.cpp's tokenizer test vectors (models/ggml-vocab-*.gguf.inp/.out)."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from numallm.errors import GGUFError, UnsupportedError
from numallm.gguf_file import GGUFFile
from numallm.tokenizer import Tokenizer

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
VOCAB = MODELS / "vocab"
STORIES = MODELS / "stories260K.gguf"
LLAMA3 = MODELS / "tokenizers" / "llama3.2"

# vocabularies with a .gguf and test vectors here
WITH_GGUF = ["llama-spm", "phi-3", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "mpt",
             "refact", "starcoder", "bert-bge"]
# llama.cpp's clean_spaces decode pass is on for these (BPE/WPM unless the pre type turns it off)
CLEAN_SPACES = {"falcon", "gpt-2", "mpt", "refact", "starcoder", "llama-bpe"}
NO_GGUF = {
    "qwen2": "the qwen2 vocab GGUF is over 4 MiB and missing from shared/models",
    "deepseek-r1-qwen": "its vocab GGUF was never committed upstream",
    "command-r": "the command-r vocab GGUF is over 4 MiB and missing from shared/models",
    "chameleon": "its vocab GGUF was never committed upstream (and chameleon is not supported)",
    "roberta-bpe": "its vocab GGUF was never committed upstream",
}
# first 40 greedy tokens of stories260K from BOS (shared/models/MANIFEST.md)
STORY_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401,
             396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432,
             358, 394, 261, 370, 432, 352]


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found (shared/models test data is not checked out)")
    return path


@functools.lru_cache(maxsize=None)
def vocab(name: str) -> Tokenizer:
    return Tokenizer.from_metadata(GGUFFile(need(VOCAB / f"ggml-vocab-{name}.gguf")).metadata)


@functools.lru_cache(maxsize=None)
def llama3() -> Tokenizer:
    return Tokenizer.from_bpe_files(need(LLAMA3 / "encoder.json"), need(LLAMA3 / "vocab.bpe"),
                                    pre="llama-bpe")


@functools.lru_cache(maxsize=None)
def stories() -> Tokenizer:
    return Tokenizer.from_metadata(GGUFFile(need(STORIES)).metadata)


def load_cases(name: str) -> list[tuple[str, list[int]]]:
    """Split like llama.cpp's test-tokenizer-0: strings separated by "\\n__ggml_vocab_test__\\n",
    one line of expected ids per string. Read as bytes so no newline translation happens."""
    raw = need(VOCAB / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    texts = raw.split("\n__ggml_vocab_test__\n")
    if texts[-1] == "":  # the file ends with a separator
        texts.pop()
    lines = need(VOCAB / f"ggml-vocab-{name}.gguf.out").read_bytes().decode("utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    assert len(texts) == len(lines) > 40
    return [(t, [int(x) for x in ln.split()]) for t, ln in zip(texts, lines)]


def clean_spaces_reference(s: str) -> str:
    """Independent regex version of llama.cpp's decode-time space cleanup."""
    s = re.sub(r" (?=[?!.,])", "", s)
    s = s.replace(" ' ", "'")
    return re.sub(r" '(?=s|m|re|ve)", "'", s)


def tokenizer_for(name: str) -> Tokenizer:
    return llama3() if name == "llama-bpe" else vocab(name)


# -- 1/2: llama.cpp test vectors -------------------------------------------------------------
@pytest.mark.parametrize("name", WITH_GGUF + ["llama-bpe"])
def test_encode_matches_llamacpp_vectors(name):
    tok = tokenizer_for(name)
    cases = load_cases(name)
    # test-tokenizer-0 tokenizes with add_special=false, parse_special=false
    bad = [(s, tok.encode(s, add_special=False), ids) for s, ids in cases
           if tok.encode(s, add_special=False) != ids]
    assert not bad, f"{len(bad)}/{len(cases)} mismatches, first: {bad[0]!r}"


ROUNDTRIP = [n for n in WITH_GGUF if n != "bert-bge"] + ["llama-bpe"]  # WPM lowercases


@pytest.mark.parametrize("name", ROUNDTRIP)
def test_decode_roundtrip(name):
    tok = tokenizer_for(name)
    changed = 0
    for s, _ in load_cases(name):
        out = tok.decode(tok.encode(s, add_special=False))
        expect = clean_spaces_reference(s) if name in CLEAN_SPACES else s
        assert out == expect, f"{s!r} decoded as {out!r}"
        changed += out != s
    # the vectors contain " ?" and " 's"-style text, so the cleanup must have been exercised
    assert (changed > 0) == (name in CLEAN_SPACES)


def test_wordpiece_decode_lowercases_and_cleans():
    tok = vocab("bert-bge")
    ids = tok.encode("Hello, World!", add_special=False)
    assert tok.decode(ids) == " hello, world!"
    assert tok.encode("Hello", add_special=True) == [tok.bos_id, *tok.encode("hello", False), 102]


@pytest.mark.parametrize("name", sorted(NO_GGUF))
def test_vectors_without_vocab(name):
    pytest.skip(f"{name}: {NO_GGUF[name]}")


# -- 3: stories260K --------------------------------------------------------------------------
def test_stories_decode_and_reencode():
    tok = stories()
    assert tok.vocab_size == 512 and tok.add_bos and not tok.add_eos
    text = tok.decode([tok.bos_id, *STORY_IDS], skip_special=True)
    assert text.startswith(" Once upon a time")
    # like llama.cpp, a plain decode drops the SPM prefix space of the first piece
    assert tok.decode(STORY_IDS) == text[1:]
    assert tok.decode([tok.bos_id, *STORY_IDS]) == "<s>" + text
    # the model's own greedy tokens are the canonical tokenization of the text they spell
    assert tok.encode(text[1:]) == [tok.bos_id, *STORY_IDS]


@pytest.mark.parametrize("sentence", ["Lily and Ben went to the park.",
                                      "The sun was shining!\nThey played all day, happy.",
                                      "Tom said: \"I'm tired\" 42 times"])
def test_stories_encode_sentences(sentence):
    tok = stories()
    ids = tok.encode(sentence)
    assert ids[0] == tok.bos_id and all(0 <= i < 512 for i in ids)
    assert len(ids) < len(sentence)  # real merges happened, not just characters/bytes
    assert tok.decode(ids[1:]) == sentence
    assert b"".join(tok.token_to_piece(i) for i in ids[1:]) == (" " + sentence).encode()


# -- 4: streaming ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,text", [("stories", "A 你好 day 🦙!"),
                                       ("llama-spm", " this is 🦙.cpp 😶‍🌫️ Cửa Việt"),
                                       ("gpt-2", "нещо 🚀 我想在apple工作")])
def test_stream_decoder_multibyte(name, text):
    tok = stories() if name == "stories" else vocab(name)
    ids = tok.encode(text, add_special=False)
    pieces = [tok.token_to_piece(i) for i in ids]
    assert any(not _valid_utf8(p) for p in pieces), "test needs a character split over tokens"
    dec = tok.stream_decoder()
    chunks = [dec.push(i) for i in ids] + [dec.flush()]
    assert all("\ufffd" not in c for c in chunks)
    assert "" in chunks[:-1]  # some push held back an incomplete character
    assert "".join(chunks) == b"".join(pieces).decode("utf-8")


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stream_decoder_invalid_bytes_and_specials():
    tok = vocab("llama-spm")
    ids = tok.encode("\U0001F999", add_special=False)  # "▁" then 4 byte tokens
    assert len(ids) == 5
    dec = tok.stream_decoder()
    assert dec.push(ids[0]) == " " and dec.push(ids[1]) == ""
    assert dec.flush() == "\ufffd"  # an unfinished character is replaced, not lost silently
    assert dec.push(tok.eos_id) == ""  # control tokens are skipped by default
    assert tok.stream_decoder(skip_special=False).push(tok.eos_id) == "</s>"


# -- special tokens, flags -------------------------------------------------------------------
def test_parse_special_phi3():
    tok = vocab("phi-3")
    user, end = tok.encode("<|user|>", False, True), tok.encode("<|end|>", False, True)
    assert len(user) == 1 and len(end) == 1 and end[0] in tok.eot_ids
    prompt = "<|user|>\nHi there<|end|>\n<|assistant|>"
    ids = tok.encode(prompt, add_special=True, parse_special=True)
    assert ids[0] == tok.bos_id and user[0] in ids and end[0] in ids
    plain = tok.encode(prompt, add_special=False)
    assert user[0] not in plain and tok.decode(plain) == prompt
    # Phi-3's special tokens eat the whitespace after them (rstrip), as in llama.cpp and HF
    assert ids[1:5] == [user[0], *tok.encode("Hi there", False), end[0]]
    assert tok.decode(ids, skip_special=True) == " Hi there"


def test_user_defined_tokens_always_match():
    tok = vocab("deepseek-coder")
    ue = tok.encode("ü", add_special=False)
    assert len(ue) == 1 and tok.token_to_piece(ue[0]) == "ü".encode()
    bos = tok.encode("<｜begin▁of▁sentence｜>", add_special=False, parse_special=True)
    assert bos == [tok.bos_id]
    assert tok.encode("<｜begin▁of▁sentence｜>", add_special=False) != bos


@pytest.mark.parametrize("name,add_bos,eot_texts", [
    ("llama-spm", True, ["</s>"]),
    ("phi-3", True, ["<|endoftext|>", "<|end|>"]),
    ("gpt-2", False, ["<|endoftext|>"]),
    ("deepseek-llm", True, ["<｜end▁of▁sentence｜>"]),
    ("starcoder", False, ["<|endoftext|>"]),
])
def test_special_ids_and_flags(name, add_bos, eot_texts):
    tok = vocab(name)
    assert tok.add_bos is add_bos and tok.add_eos is False
    eots = {tok.encode(t, False, True)[0] for t in eot_texts}
    assert eots <= tok.eot_ids and tok.eos_id in tok.eot_ids
    with_bos = tok.encode("Hello", add_special=True)
    assert (with_bos[0] == tok.bos_id) is add_bos


def test_end_of_turn_found_by_text_and_forced_to_control():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
            "tokenizer.ggml.tokens": ["a", "<|im_end|>", "<|fim_pad|>", "b"],
            "tokenizer.ggml.token_type": [1, 1, 1, 1], "tokenizer.ggml.merges": [],
            "tokenizer.ggml.eos_token_id": 3}
    tok = Tokenizer.from_metadata(meta)
    assert tok.eot_ids == {1, 2, 3}
    assert tok.decode([0, 1], skip_special=True) == "a"  # now a control token
    assert tok.encode("a<|im_end|>", add_special=False, parse_special=True) == [0, 1]


def test_unsupported_and_broken_metadata():
    with pytest.raises(UnsupportedError, match="llama"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(UnsupportedError, match="pre"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "nope",
                                 "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []})
    with pytest.raises(GGUFError):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama"})
    with pytest.raises(GGUFError):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"],
                                 "tokenizer.ggml.scores": [0.0, 1.0]})


def test_bpe_skips_merges_outside_vocab():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": ["a", "b", "ab", "c"],
            "tokenizer.ggml.merges": ["a b", "b c", "x y"]}  # "bc" and "x" are not tokens
    tok = Tokenizer.from_metadata(meta)
    assert tok.encode("abc", add_special=False) == [2, 3]


# -- 5: load speed sanity ----------------------------------------------------------------------
def test_load_102k_vocab():
    # its start-up time is measured in benchmarks/bench_tokenizer.py, not asserted here
    meta = GGUFFile(need(VOCAB / "ggml-vocab-deepseek-llm.gguf")).metadata
    assert Tokenizer.from_metadata(meta).vocab_size == 102400
