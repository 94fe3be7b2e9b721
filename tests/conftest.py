"""Fixtures shared by several test files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_pipeline(run_dir: Path, preset: str = "tiny", seed: int = 0, timeout: int = 900) -> Path:
    """run.sh with PRESET / RUN / SEED, run by the interpreter that runs the tests (its python first on PATH)."""
    env = dict(os.environ, PRESET=preset, RUN=str(run_dir), SEED=str(seed),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """run.sh on the tiny preset, seed 0: every stage's artifacts in one run directory (about 25 s)."""
    return run_pipeline(tmp_path_factory.mktemp("pipeline") / "run")


@pytest.fixture(scope="session")
def other_tiny_pipeline(tmp_path_factory):
    """A second tiny run, seed 1: its files stand for "files from another run"."""
    return run_pipeline(tmp_path_factory.mktemp("pipeline-seed1") / "run", seed=1)
