"""Data-parallel training: train.py, attack.py and purify.py under torchrun with 2 gloo processes.

Every rank draws the same global batch and noise and trains on half of it, and DDP averages the
gradients, so 2 processes make the same updates as 1 (up to float summation order). The tiny
pipeline fixture (run.sh, one process, seed 0) is the reference.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from disp.support import checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # three torchrun stages, about 45 s: run with DISP_SLOW=1 (.ci/run does)


def torchrun(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 processes on 2 cores
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp")
    for script, args in (("train.py", ["--preset", "tiny", "--run-dir", str(run_dir)]),
                         ("attack.py", ["--run-dir", str(run_dir)]),
                         ("purify.py", ["--run-dir", str(run_dir)])):
        result = torchrun(script, *args)
        assert result.returncode == 0, f"{script}: {result.stderr[-3000:]}"
    return run_dir


def max_weight_difference(path_a, path_b):
    a = torch.load(path_a, weights_only=True)["model"]
    b = torch.load(path_b, weights_only=True)["model"]
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("name", ["clean", "backdoored", "purified"])
def test_two_processes_match_one(ddp_run, tiny_pipeline, name):
    """Same updates as the single-process run: the weights agree to float summation order."""
    assert max_weight_difference(ddp_run / f"{name}.pt", tiny_pipeline / f"{name}.pt") < 1e-3


def test_ddp_checkpoints_load_in_one_process(ddp_run):
    for name in ("clean", "backdoored", "purified"):
        model, _, config, state = checkpoint.load(ddp_run / f"{name}.pt", stages=[name])
        assert state["finished"] and config.preset == "tiny"
    assert not list(ddp_run.glob("*.resume.pt")) and not list(ddp_run.glob("*.tmp"))


def test_ranks_share_purification(ddp_run, tiny_pipeline):
    """Saliency and regeneration are split over ranks and gathered: same files as one process."""
    report = json.loads((ddp_run / "purified_report.json").read_text())
    reference = json.loads((tiny_pipeline / "purified_report.json").read_text())
    assert report["n_samples"] == reference["n_samples"] and report["n_changed"] == reference["n_changed"]
    rows = (ddp_run / "purified_train.jsonl").read_text().splitlines()
    assert rows == (tiny_pipeline / "purified_train.jsonl").read_text().splitlines()
    scores = torch.load(ddp_run / "purified_saliency.pt", weights_only=True)
    torch.testing.assert_close(scores, torch.load(tiny_pipeline / "purified_saliency.pt", weights_only=True),
                               atol=1e-2, rtol=1e-2)
