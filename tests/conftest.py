"""Shared fixtures: test data location and a per-session cache of synthetic GGUF models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# GPU kernels run in Numba's CUDA simulator unless the environment says otherwise (CI has no GPU;
# on a GPU machine, NUMBA_ENABLE_CUDASIM=0 runs them on the device). Set before anything imports
# numba, which reads it once.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# Test data lives beside the checkout (../shared/models), never inside it.
SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"


@pytest.fixture(scope="session")
def shared_models() -> Path:
    """The shared test-data folder; skips the test when it is absent."""
    if not SHARED_MODELS.is_dir():
        pytest.skip(f"test data folder {SHARED_MODELS} is absent")
    return SHARED_MODELS


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """Folder for synthetic models (numallm.synth.cached_model): one build per session.

    Set NUMALLM_SYNTH_CACHE to a folder to keep them across sessions (files are named by a hash
    of every generation argument and the generator version, so stale files are never reused).
    """
    env = os.environ.get("NUMALLM_SYNTH_CACHE")
    if env:
        Path(env).mkdir(parents=True, exist_ok=True)
        return Path(env)
    return tmp_path_factory.mktemp("synth")
