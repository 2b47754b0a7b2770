"""Numba's on-disk cache of the kernels is dropped when any kernel source changed: a cached
function is checked only against its own file, while it inlines code from others."""
from __future__ import annotations

from pathlib import Path

import numallm_kernels
from numallm_kernels import base


def test_stale_cache_files_go_when_the_sources_digest_changes(tmp_path, monkeypatch):
    from numba.core.caching import _CacheLocator

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    here = Path(numallm_kernels.__file__).parent
    d = tmp_path / _CacheLocator.get_suitable_cache_subpath(str(here / "base.py"))
    d.mkdir(parents=True)
    for name in ("attention._scores-1.py311.nbi", "attention._scores-1.py311.1.nbc", "keep.txt"):
        (d / name).write_text("x")
    (d / "numallm_kernels.sources").write_text("an older digest")
    base.drop_stale_caches()
    assert sorted(p.name for p in d.iterdir()) == ["keep.txt", "numallm_kernels.sources"]
    assert (d / "numallm_kernels.sources").read_text() == base._sources_digest()
    (d / "fresh.nbi").write_text("x")               # written under the current sources: kept
    base.drop_stale_caches()
    assert (d / "fresh.nbi").exists()


def test_a_new_cache_folder_is_stamped_before_numba_writes_to_it(tmp_path, monkeypatch):
    from numba.core.caching import _CacheLocator

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    here = Path(numallm_kernels.__file__).parent
    d = tmp_path / _CacheLocator.get_suitable_cache_subpath(str(here / "base.py"))
    base.drop_stale_caches()
    assert (d / "numallm_kernels.sources").read_text() == base._sources_digest()
