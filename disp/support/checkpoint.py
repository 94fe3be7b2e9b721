"""Checkpoints: one file per stage, written atomically, loaded safely.

A checkpoint is a dict of plain data and tensors only, so `torch.load(weights_only=True)` can read
it (no pickled code runs on load):
    format      FORMAT; a checkpoint of another format is refused (its weights mean something else)
    stage       "clean" | "backdoored" | "purified" (or a control's name); a run's stages chain
    finished    False while a run is in progress (a resume point), True for the final artifact
    model       state_dict;  optimizer: state_dict (to resume);  step: int
    config      Config.to_dict();  tokenizer: Tokenizer.to_dict()
    rng         torch RNG state of the training loop (bit-identical resume)
    extra       stage-specific plain data (metrics, poisoning parameters, ...)
Writes go to a temporary file in the same folder, fsync, then `os.replace`: a crash mid-write never
leaves a file that a later stage would accept. Every file the project writes (checkpoints, datasets,
JSON, markdown, figures) goes through `atomic_write`; every file it reads with torch goes through
`load_plain` (weights_only=True). Problems surface as one-line `DispError`s that name the file.
"""

from pathlib import Path

import torch

from disp.config import Config
from disp.data.tokenizer import Tokenizer
from disp.model import DiffusionVLM
from disp.support.errors import DispError
from disp.support.files import atomic_write, load_plain

# 2: the image+prompt prefix no longer attends to the response (model.py); 1 (no key): it did.
FORMAT = 2
# Which script writes a stage's checkpoint, for "run X first" hints.
STAGE_SCRIPTS = {"clean": "train.py", "backdoored": "attack.py", "purified": "purify.py",
                 "control_self_distill": "purify.py --control self-distill",
                 "control_as_is": "purify.py --control as-is"}


def save(path, *, stage, model, config, tokenizer, optimizer=None, step=0, finished=True, rng=None, extra=None):
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
        "extra": extra or {},
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


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
        raise DispError(f"{path} has checkpoint format {state.get('format', 1)} (an older disp, whose prefix "
                        f"attended to the response); this code reads format {FORMAT}: rerun train.py and the later stages")
    if stages is not None and state["stage"] not in stages:
        raise DispError(f"{path} is a '{state['stage']}' checkpoint, but this step needs one of: {', '.join(stages)}")
    return state


def check_same_model(state, path, config: Config, tokenizer: Tokenizer, source, attack=None):
    """A checkpoint that continues (resume) or is compared with (evaluate) another must come from its run.

    state: the checkpoint dict read from `path`; config / tokenizer: those of the checkpoint `source`;
    attack: the attack settings of `source` (a backdoored model), which later stages copy unchanged.
    """
    theirs, ours = state["config"]["model"], config.to_dict()["model"]
    differ = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if differ:
        k = differ[0]
        raise DispError(f"{path} and {source} come from different runs (model {k}: {theirs.get(k)!r} vs "
                        f"{ours.get(k)!r}); use the files of one run directory")
    if state["tokenizer"] != tokenizer.to_dict():
        raise DispError(f"{path} and {source} come from different runs (their vocabularies differ); "
                        f"use the files of one run directory")
    if attack is not None and (state.get("extra") or {}).get("attack") != attack:
        raise DispError(f"{path} was not made from this {source} (it was rewritten since, or comes from another "
                        f"run); rerun the stage that writes {Path(path).name}")


def build_model(config: Config, tokenizer: Tokenizer) -> DiffusionVLM:
    config.model.vocab_size = len(tokenizer)
    return DiffusionVLM(config.model, mask_id=tokenizer.mask_id)


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
