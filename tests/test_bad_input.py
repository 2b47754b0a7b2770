"""Bad input gets one clear line (what, where, what to do), a non-zero exit and no traceback.

The files are written byte by byte here (not with gguf-py) so each can be broken exactly where a
truncated download or a hostile file would be.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from numallm.errors import GGUFError, UnsupportedError
from numallm.gguf_file import GGUFFile


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _kv_str(key, val):
    return _s(key) + struct.pack("<I", 8) + _s(val)


def _kv_u32(key, val):
    return _s(key) + struct.pack("<I", 4) + struct.pack("<I", val)


def write_gguf(path, kvs: list[bytes], tensors: list[tuple], data: bytes | None = None,
               n_tensors=None, n_kv=None, align=32):
    """tensors: (name, ne list, type id, offset). data: bytes after the aligned header."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs)
    for name, ne, qtype, off in tensors:
        head += _s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        head += struct.pack("<IQ", qtype, off)
    head += b"\0" * (-len(head) % align)
    with open(path, "wb") as f:
        f.write(head + (data or b""))
    return str(path)


def tiny_llama(path, drop=None, arch="llama", qtype=0, ne_override=None, truncate=0, heads=2,
               extra_kvs=(), types=None):
    """A complete, valid 1-layer llama (F32) unless one thing is broken on purpose."""
    E, FF, V = 8, 16, 4
    names = {"token_embd.weight": [E, V], "output_norm.weight": [E], "blk.0.attn_norm.weight": [E],
             "blk.0.attn_q.weight": [E, E], "blk.0.attn_k.weight": [E, E], "blk.0.attn_v.weight": [E, E],
             "blk.0.attn_output.weight": [E, E], "blk.0.ffn_norm.weight": [E],
             "blk.0.ffn_gate.weight": [E, FF], "blk.0.ffn_up.weight": [E, FF], "blk.0.ffn_down.weight": [FF, E]}
    tensors, off, data = [], 0, b""
    for n, ne in names.items():
        if n == drop:
            continue
        ne = ne_override if (ne_override and n == "blk.0.attn_q.weight") else ne
        tensors.append((n, ne, (types or {}).get(n, qtype if n == "blk.0.attn_q.weight" else 0), off))
        size = int(np.prod(ne)) * 4 if n != "blk.0.attn_q.weight" or not ne_override else 0
        chunk = np.full(int(np.prod(ne)) if size else 0, 0.01, np.float32).tobytes()
        chunk += b"\0" * (-len(chunk) % 32)
        data += chunk
        off += len(chunk)
    kvs = [_kv_str("general.architecture", arch), _kv_u32(f"{arch}.embedding_length", E),
           _kv_u32(f"{arch}.block_count", 1), _kv_u32(f"{arch}.feed_forward_length", FF),
           _kv_u32(f"{arch}.attention.head_count", heads), _kv_str("tokenizer.ggml.model", "llama"),
           _s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, V) + b"".join(_s(t) for t in ["<unk>", "<s>", "</s>", "a"]),
           _s("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, V) + np.zeros(V, np.float32).tobytes(),
           _s("tokenizer.ggml.token_type") + struct.pack("<IIQ", 9, 5, V) + np.array([2, 3, 3, 1], np.int32).tobytes(),
           _kv_u32("tokenizer.ggml.bos_token_id", 1), _kv_u32("tokenizer.ggml.eos_token_id", 2),
           *extra_kvs]
    p = write_gguf(path, kvs, tensors, data)
    if truncate:
        os.truncate(p, os.path.getsize(p) - truncate)
    return p


def cli(*args, env_debug=False):
    env = dict(os.environ)
    env.pop("NUMALLM_DEBUG", None)
    if env_debug:
        env["NUMALLM_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "numallm", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def assert_one_line(r, *needles):
    assert r.returncode != 0, r
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_valid_tiny_model_loads(tmp_path):
    import numallm

    llm = numallm.load(tiny_llama(tmp_path / "ok.gguf"))
    assert llm.logits([1, 3]).shape == (2, 4)


CASES = {
    # name: (builder, expected substrings in the error line)
    "truncated_header": (lambda p: tiny_llama(p, truncate=os.path.getsize(tiny_llama(p)) - 40),
                         ["truncated", "re-download"]),
    "truncated_data": (lambda p: tiny_llama(p, truncate=40), ["truncated", "blk.0.ffn_down.weight"]),
    "tensor_past_end": (lambda p: write_gguf(p, [_kv_str("general.architecture", "llama")],
                                             [("w", [32, 4], 0, 1 << 40)]), ["tensor w", "truncated"]),
    "absurd_shape": (lambda p: write_gguf(p, [], [("big", [1 << 30, 1 << 30, 1 << 30], 0, 0)]),
                     ["absurd shape", "big"]),
    "absurd_tensor_count": (lambda p: write_gguf(p, [], [], n_tensors=1 << 60), ["tensors"]),
    "absurd_string": (lambda p: write_gguf(p, [struct.pack("<Q", 1 << 62) + b"x"], []), ["string"]),
    "absurd_array": (lambda p: write_gguf(p, [_s("a") + struct.pack("<IIQ", 9, 8, 1 << 40)], []),
                     ["array"]),
    "unknown_quant_type": (lambda p: tiny_llama(p, qtype=200), ["unknown quantization type 200",
                                                                "blk.0.attn_q.weight"]),
    "unknown_architecture": (lambda p: tiny_llama(p, arch="mamba9"), ["architecture 'mamba9'",
                                                                      "not supported"]),
    "missing_tensor": (lambda p: tiny_llama(p, drop="blk.0.ffn_up.weight"),
                       ["blk.0.ffn_up.weight is missing"]),
    "wrong_shape": (lambda p: tiny_llama(p, ne_override=[4, 4]), ["blk.0.attn_q.weight", "shape"]),
    "not_gguf": (lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 100) and str(p), ["not a GGUF file"]),
    "missing_file": (lambda p: str(p) + ".nope", ["no such model file"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_model_gives_one_line(tmp_path, case):
    build, needles = CASES[case]
    path = build(tmp_path / f"{case}.gguf")
    r = cli("run", str(path), "hi", "-n", "1")
    assert_one_line(r, "numallm: error:", *needles)


def test_debug_shows_traceback(tmp_path):
    r = cli("run", tiny_llama(tmp_path / "m.gguf", drop="output_norm.weight"), "x", env_debug=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_errors_are_typed_in_library(tmp_path):
    with pytest.raises(GGUFError):
        GGUFFile(tiny_llama(tmp_path / "t.gguf", truncate=40))
    import numallm
    with pytest.raises(UnsupportedError):
        numallm.load(tiny_llama(tmp_path / "a.gguf", arch="mamba9"))


def test_context_overflow(tmp_path):
    r = cli("run", tiny_llama(tmp_path / "m.gguf"), "a " * 40, "-c", "8", "-n", "1")
    assert_one_line(r, "context", "-c")


def test_unknown_flag_is_argparse_error(tmp_path):
    r = cli("run", "--no-such-flag")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_context_larger_than_memory(tmp_path):
    r = cli("run", tiny_llama(tmp_path / "m.gguf"), "a", "-c", str(1 << 36), "-n", "1")
    assert_one_line(r, "KV cache", "lower the context size")
