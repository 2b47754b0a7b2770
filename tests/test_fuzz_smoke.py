"""The GGUF fuzz target (tests/fuzz/fuzz_gguf.py) in CI: mutated seeds through the same target
without atheris (always), and a one-minute libFuzzer run where atheris is installed."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "fuzz"))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    from fuzz_gguf import write_seeds

    return write_seeds(tmp_path_factory.mktemp("seeds"))


EDGES = [0, 1, 3, 255, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1]


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """A few of libFuzzer's mutations: byte flips, little-endian integer overwrites (where header
    counts and dimensions live), truncation."""
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(3))
        at = int(rng.integers(len(b))) if b else 0
        if kind == 0 and b:
            b[at] ^= 1 << int(rng.integers(8))
        elif kind == 1 and len(b) >= 8:
            at = min(at, len(b) - 8)
            v = EDGES[int(rng.integers(len(EDGES)))]
            b[at:at + 8] = v.to_bytes(8, "little")
        else:
            del b[at:]
    return bytes(b)


def test_mutated_seeds_only_raise_user_errors(seeds):
    from fuzz_gguf import one_input

    rng = np.random.default_rng(13)
    for p in seeds:
        data = p.read_bytes()
        one_input(data)
        header = data[:4096]   # mutate the header only: that is where the arithmetic lives
        for _ in range(100):
            one_input(_mutate(header, rng) + data[4096:])


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_libfuzzer_minute(seeds, tmp_path):
    seconds = os.environ.get("NUMALLM_FUZZ_SECONDS", "60")
    r = subprocess.run([sys.executable, str(HERE / "fuzz" / "fuzz_gguf.py"), str(seeds[0].parent),
                        f"-max_total_time={seconds}", "-rss_limit_mb=3072", "-timeout=10"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=int(seconds) + 300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Done" in r.stderr
