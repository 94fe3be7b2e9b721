"""Checkpoints: one file per stage, written atomically, loaded safely, tied to the files they came from.

A checkpoint is a dict of plain data and tensors only, so `torch.load(weights_only=True)` can read
it (no pickled code runs on load):
    format      FORMAT; a checkpoint of another format is refused (its weights mean something else)
    stage       "clean" | "backdoored" | "purified" (or a control's name); a run's stages chain
    finished    False while a run is in progress (a resume point), True for the final artifact
    model       state_dict;  optimizer: state_dict (to resume);  step: int
    config      Config.to_dict();  tokenizer: Tokenizer.to_dict()
    rng         torch RNG state of the training loop (bit-identical resume)
    made_from   {file name in the run directory: sha256} of every file the stage read or wrote with it
                (its parent checkpoint, its data files); later stages check them (`check_made_from`)
    extra       stage-specific plain data (settings, metrics)
A stage writes its files as one unit (`files.one_unit`: all written, then all renamed, the checkpoint
last); should a crash fall between two renames, the checkpoint's `made_from` no longer matches the
files and the next stage refuses the mix.
"""

from pathlib import Path

import torch

from disp.config import Config
from disp.data.tokenizer import Tokenizer
from disp.model import DiffusionVLM
from disp.support import errors
from disp.support.errors import DispError
from disp.support.files import atomic_write, load_plain, sha256

# 3: checkpoints record the files they were made from; 2: no provenance; 1: the prefix attended to the response.
FORMAT = 3
# Which script writes a stage's checkpoint, for "run X first" hints.
STAGE_SCRIPTS = {"clean": "train.py", "backdoored": "attack.py", "purified": "purify.py",
                 "control_self_distill": "purify.py --control self-distill",
                 "control_as_is": "purify.py --control as-is"}


def save(path, *, stage, model, config, tokenizer, optimizer=None, step=0, finished=True, rng=None,
         made_from=None, extra=None):
    """Write a checkpoint; made_from: {file name: sha256} of the files it was made from."""
    state = {
        "format": FORMAT,
        "stage": stage,
        "finished": finished,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "config": config.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "rng": rng,
        "made_from": made_from or {},
        "extra": extra or {},
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    if not finished:
        errors.last_resume_point = path  # Ctrl-C's message names it


def load_state(path, stages=None):
    """Read and validate a checkpoint dict; `stages` lists the stages the caller accepts."""
    path = Path(path)
    if not path.exists() and path.parent.is_dir():
        if path.name.endswith(".resume.pt"):
            raise DispError(f"no resume point {path} (it does not exist): nothing to resume, rerun without --resume")
        scripts = sorted({STAGE_SCRIPTS.get(s, "the stage that writes it") for s in stages or ()})
        hint = f"run {' or '.join(scripts)} first" if scripts else "run the stage that writes it first"
        raise DispError(f"checkpoint {path} does not exist; {hint}")
    state = load_plain(path, "checkpoint")
    if not isinstance(state, dict) or not {"stage", "model", "config", "tokenizer"} <= set(state):
        raise DispError(f"{path} is not a disp checkpoint (missing stage/model/config/tokenizer)")
    if state.get("format", 1) != FORMAT:
        raise DispError(f"{path} has checkpoint format {state.get('format', 1)} (written by an older disp); this code "
                        f"reads format {FORMAT}: rerun train.py and the later stages")
    if stages is not None and state["stage"] not in stages:
        raise DispError(f"{path} is a '{state['stage']}' checkpoint, but this step needs one of: {', '.join(stages)}")
    return state


def check_made_from(state, path, run_dir, names):
    """Each named file of run_dir must be the very file the checkpoint at `path` was made from.

    state: the checkpoint dict read from `path`. A file rewritten since, or copied in from another
    run, has another sha256 than the one recorded: a one-line error names both files.
    """
    recorded = state.get("made_from") or {}
    for name in names:
        if name not in recorded:
            raise DispError(f"{path} does not record which {name} it was made from; rerun "
                            f"{STAGE_SCRIPTS.get(state['stage'], 'its stage')}")
        if sha256(Path(run_dir) / name) != recorded[name]:
            raise DispError(f"{Path(run_dir) / name} is not the file {path} was made from (rewritten since, or "
                            f"from another run); use the files of one run, or rerun "
                            f"{STAGE_SCRIPTS.get(state['stage'], 'its stage')}")


def build_model(config: Config, tokenizer: Tokenizer) -> DiffusionVLM:
    if config.model.vocab_size != len(tokenizer):
        raise DispError(f"the config's vocab_size {config.model.vocab_size} does not match the tokenizer's "
                        f"{len(tokenizer)} words; rerun train.py")
    return DiffusionVLM(config.model, mask_id=tokenizer.mask_id, unk_id=tokenizer.unk_id)


def load(path, stages=None, device="cpu"):
    """-> (model in eval mode, tokenizer, config, state dict) from a checkpoint file."""
    state = load_state(path, stages)
    try:
        config = Config.from_dict(state["config"])
        tokenizer = Tokenizer.from_dict(state["tokenizer"])
    except (KeyError, TypeError, AssertionError) as err:
        raise DispError(f"{path}: its config or tokenizer cannot be read ({type(err).__name__}: {err}); "
                        f"was it written by another version? rerun its stage") from None
    model = build_model(config, tokenizer)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise DispError(f"{path}: weights do not fit the stored config ({str(err).splitlines()[0][:120]})")
    return model.to(device).eval(), tokenizer, config, state
