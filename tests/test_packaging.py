"""kernels/ is installed under the import name numallm_kernels, in editable and normal installs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import numallm, numallm_kernels; print(numallm.__file__); print(numallm_kernels.__file__)"


def _probe(cwd, env=None):
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return [Path(p) for p in r.stdout.split()]


def test_editable_install_maps_kernels_folder(tmp_path):
    numallm_file, kernels_file = _probe(tmp_path)  # outside the checkout: only the install can find them
    if ROOT not in numallm_file.parents:
        pytest.skip("numallm is not installed in editable mode from this checkout")
    assert kernels_file.parent == ROOT / "kernels"


@pytest.mark.slow
def test_wheel_install_contains_kernels(tmp_path):
    wheel_dir, target, src = tmp_path / "wheel", tmp_path / "site", tmp_path / "src"
    # build from a copy without build outputs, as from a clean clone: setuptools reuses an existing
    # build/lib, where a module deleted from the sources would linger and ship in the wheel
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        "build", "dist", ".venv", "*.egg-info", "__pycache__", ".git", ".pytest_cache", ".benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(wheel_dir), str(src)], check=True, timeout=300, capture_output=True)
    wheel = next(wheel_dir.glob("numallm-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True, timeout=300, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    numallm_file, kernels_file = _probe(tmp_path, env)
    assert target in numallm_file.parents and target in kernels_file.parents
    assert (target / "numallm_kernels" / "base.py").is_file()
    shipped = {p.name for p in (target / "numallm_kernels").glob("*.py")}
    assert shipped == {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert not (target / "kernels").exists()  # never the bare name a PyPI package owns
    # every source package made it into the wheel (a package missing from setup.cfg would not)
    for init in (ROOT / "numallm").rglob("__init__.py"):
        assert (target / init.relative_to(ROOT)).is_file(), f"{init.parent.name} missing from the wheel"
