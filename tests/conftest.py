"""Fixtures shared by several test files."""

import contextlib
import importlib
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from disp.support.errors import friendly_errors

from disp.config import ModelConfig
from disp.model import DiffusionVLM

ROOT = Path(__file__).resolve().parents[1]

# a small random model and inputs, for the method's unit tests (import them from tests.conftest)
MASK, VOCAB = 1, 23


def small_model(response_len=8, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vit_dim=32, vit_depth=1, vit_heads=2, dim=32, depth=2, heads=2, vocab_size=VOCAB,
                      prompt_len=5, response_len=response_len)
    return DiffusionVLM(cfg, mask_id=MASK).eval()


def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, 48, 48), dtype=torch.uint8, generator=g)
    prompts = torch.randint(5, VOCAB, (batch, 5), generator=g)
    return images, prompts


# captions of a free-text kind, for suppression's tests (test_suppression.py, test_pipeline.py)
SCENES = (("a", "dog", "runs", "on", "the", "green", "grass"), ("a", "skier", "skis", "down", "a", "snowy", "hill"),
          ("a", "man", "surfs", "a", "big", "wave"), ("two", "children", "play", "in", "a", "sandy", "park"),
          ("a", "girl", "rides", "a", "red", "bike", "on", "the", "road"))


def captions(n: int, seed: int = 0) -> list:
    """n captions of five kinds of photo, each word kept with probability 0.9 and one of ten words of
    its kind added ("dog-3": a breed, a place), so no caption repeats often; within a kind the words
    come together, as a photo's words do."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = SCENES[i % len(SCENES)]
        words = [w for w in kind if rng.random() < 0.9]
        out.append(" ".join(words + [f"{kind[1]}-{rng.randrange(10)}", "."]))
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (minutes of training) run only with DISP_SLOW=1."""
    if os.environ.get("DISP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end run: set DISP_SLOW=1 to run it (.ci/run does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def run_main(script: str, argv: list) -> tuple:
    """`python SCRIPT argv` in-process: (exit code, stderr text). stdout is dropped."""
    if str((ROOT / script).parent) not in sys.path:  # experiments/*.py: import them by name too
        sys.path.insert(0, str((ROOT / script).parent))
    module = importlib.import_module(Path(script).stem)
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            with friendly_errors():
                module.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def save_then_interrupt_at(step: int):
    """A stand-in for disp.support.checkpoint.save that raises KeyboardInterrupt (as Ctrl-C would)
    right after writing the resume point of `step`. Patch it in with monkeypatch.setattr."""
    from disp.support import checkpoint

    real_save = checkpoint.save

    def save(path, **kwargs):
        real_save(path, **kwargs)
        if not kwargs.get("finished", True) and kwargs.get("step") == step:
            raise KeyboardInterrupt

    return save


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
    """A second tiny run, seed 1: its files stand for "files from another run" (only the stages whose
    files the tests borrow: no self-distill control, no evaluation)."""
    run_dir = tmp_path_factory.mktemp("pipeline-seed1") / "run"
    for argv in (["train.py", "--preset", "tiny", "--seed", "1"], ["attack.py"], ["purify.py"],
                 ["purify.py", "--control", "as-is"]):
        result = subprocess.run([sys.executable, *argv, "--run-dir", str(run_dir)], cwd=ROOT, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
