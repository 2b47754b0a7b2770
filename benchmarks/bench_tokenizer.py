"""Tokenizer start-up on a 102k-token BPE vocabulary (deepseek-llm): building the vocabulary
tables and the HuggingFace BPE model from GGUF metadata.

Run:  .venv/bin/pytest benchmarks/bench_tokenizer.py --benchmark-enable
Skips when ../shared/models is absent. Not asserted: a shared machine's timings are noisy.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from numallm.gguf_file import GGUFFile
from numallm.tokenizer import Tokenizer

VOCAB = (Path(__file__).resolve().parents[1].parent / "shared" / "models" / "vocab"
         / "ggml-vocab-deepseek-llm.gguf")


def test_load_102k_vocab(benchmark):
    if not VOCAB.exists():
        pytest.skip(f"{VOCAB} is absent")
    meta = GGUFFile(str(VOCAB)).metadata
    tok = benchmark(Tokenizer.from_metadata, meta)
    assert tok.vocab_size == 102400
