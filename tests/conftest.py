"""Fixtures shared by several test files."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """run.sh on the tiny preset, seed 0: every stage's artifacts in one run directory (about 30 s)."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    env = dict(os.environ, PRESET="tiny", RUN=str(run_dir))
    result = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
