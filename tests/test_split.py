"""Split GGUF models (llama.cpp's gguf-split layout): one model from all parts, errors per part.

Parts are written by numallm.synth_split (gguf-py's writer in split mode: the first part holds
the metadata, every part the split.* keys and some tensors)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from numallm import synth_deepseek
from numallm.errors import GGUFError
from numallm.gguf_file import GGUFFile
from numallm.synth_split import split_gguf

TOKENS = [5, 77, 300, 12, 999, 41, 7, 256]


@pytest.fixture(scope="module")
def split_v3(synth_dir, tmp_path_factory):
    src = synth_deepseek.cached_deepseek(synth_dir, "Q8_0", "tiny-v3", seed=0)
    parts = split_gguf(src, tmp_path_factory.mktemp("split") / "v3.gguf", 3)
    return src, parts


def test_split_reads_every_part(split_v3):
    src, parts = split_v3
    assert [p.name for p in parts] == [f"v3-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    whole, split = GGUFFile(src), GGUFFile(parts[0])
    assert len(split.parts) == 3 and all(p.own_tensors > 0 for p in split.parts)
    assert sum(p.own_tensors for p in split.parts) == len(whole.tensors) == len(split.tensors)
    assert split.total_size > whole.file_size        # three headers
    for name, t in whole.tensors.items():
        s = split.tensors[name]
        assert (s.qtype, s.shape) == (t.qtype, t.shape) and np.array_equal(s.data, t.data), name
    # the planner and the memory check count every part's tensors
    from numallm.placement import ModelSpec
    assert ModelSpec.from_gguf(split).weight_bytes == ModelSpec.from_gguf(whole).weight_bytes
    # each tensor is a view of its own part's map, not a copy
    assert any(split.tensors[n].data.base is not None and
               np.shares_memory(split.tensors[n].data, split.parts[2]._map) for n in split.tensors)


def test_split_same_logits_as_unsplit(split_v3):
    from numallm import load

    src, parts = split_v3
    a = np.asarray(load(src).logits(TOKENS))
    b = np.asarray(load(parts[0]).logits(TOKENS))
    assert np.all(np.isfinite(a)) and a.std() > 0.1
    np.testing.assert_array_equal(a, b)


def test_split_part_errors(split_v3, tmp_path):
    src, parts = split_v3
    d = tmp_path / "p"
    d.mkdir()
    for p in parts:
        shutil.copy(p, d / p.name)
    first, second, third = (d / p.name for p in parts)
    with pytest.raises(GGUFError, match=r"this is part 2 of 3 of a split model; give its first part "
                                        r"\(.*v3-00001-of-00003.gguf\)"):
        GGUFFile(second)
    third.unlink()
    with pytest.raises(GGUFError, match=r"part 3 of 3 \(v3-00003-of-00003.gguf\) is missing"):
        GGUFFile(first)
    shutil.copy(second, third)                       # a wrong part under the right name
    with pytest.raises(GGUFError, match=r"says it is part 2 of 3 .* expects part 3 of 3"):
        GGUFFile(first)
    (tmp_path / "o").mkdir()
    other = split_gguf(src, tmp_path / "o" / "v3.gguf", 2)
    shutil.copy(other[1], third)                     # a part of a 2-part split of the same model
    with pytest.raises(GGUFError, match=r"says it is part 2 of 2 .* expects part 3 of 3"):
        GGUFFile(first)
    renamed = d / "renamed.gguf"
    shutil.copy(first, renamed)
    with pytest.raises(GGUFError, match="not named PREFIX-00001-of-00003.gguf"):
        GGUFFile(renamed)


def test_split_cli_info_and_errors(split_v3, tmp_path):
    src, parts = split_v3
    env = {k: v for k, v in os.environ.items() if k != "NUMALLM_DEBUG"}
    info = subprocess.run([sys.executable, "-m", "numallm", "info", str(parts[0])], env=env,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "parts         3 files (split GGUF): v3-00001-of-00003.gguf (" in info.stdout
    bad = subprocess.run([sys.executable, "-m", "numallm", "info", str(parts[1])], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "give its first part" in bad.stderr


@pytest.mark.llamacpp
def test_llamacpp_reads_our_split(split_v3):
    """The parts are llama.cpp's layout: llama.cpp loads them from the first part and agrees."""
    pytest.importorskip("llama_cpp")
    from test_llamacpp_parity import llamacpp_logits

    src, parts = split_v3
    np.testing.assert_allclose(llamacpp_logits(parts[0], TOKENS), llamacpp_logits(src, TOKENS),
                               rtol=0, atol=1e-4)
