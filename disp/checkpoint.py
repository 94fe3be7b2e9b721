"""Checkpoints: one file per stage, written atomically, loaded safely.

A checkpoint is a dict of plain data and tensors only, so `torch.load(weights_only=True)` can read
it (no pickled code runs on load):
    stage       "clean" | "backdoored" | "purified" (or a control's name); a run's stages chain
    finished    False while a run is in progress (a resume point), True for the final artifact
    model       state_dict;  optimizer: state_dict (to resume);  step: int
    config      Config.to_dict();  tokenizer: Tokenizer.to_dict()
    rng         torch RNG state of the training loop (bit-identical resume)
    extra       stage-specific plain data (metrics, poisoning parameters, ...)
Writes go to a temporary file in the same folder, then `os.replace`: a crash mid-write never
leaves a file that a later stage would accept.
"""

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from disp.config import Config
from disp.errors import DispError
from disp.model import DiffusionVLM
from disp.tokenizer import Tokenizer


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path), then rename the temp file onto path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, data):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def save(path, *, stage, model, config, tokenizer, optimizer=None, step=0, finished=True, rng=None, extra=None):
    state = {
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
    if not path.exists():
        raise DispError(f"checkpoint {path} does not exist; run the stage that writes it first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else "unsafe content"
        raise DispError(f"checkpoint {path} holds pickled objects and is refused for safety ({first_line[:120]})")
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise DispError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}); delete it and rerun its stage")
    if not isinstance(state, dict) or not {"stage", "model", "config", "tokenizer"} <= set(state):
        raise DispError(f"{path} is not a disp checkpoint (missing stage/model/config/tokenizer)")
    if stages is not None and state["stage"] not in stages:
        raise DispError(f"{path} is a '{state['stage']}' checkpoint, but this step needs one of: {', '.join(stages)}")
    return state


def build_model(config: Config, tokenizer: Tokenizer) -> DiffusionVLM:
    config.model.vocab_size = len(tokenizer)
    return DiffusionVLM(config.model, mask_id=tokenizer.mask_id, img_id=tokenizer.img_id)


def load(path, stages=None, device="cpu"):
    """-> (model in eval mode, tokenizer, config, state dict) from a checkpoint file."""
    state = load_state(path, stages)
    config = Config.from_dict(state["config"])
    tokenizer = Tokenizer.from_dict(state["tokenizer"])
    model = build_model(config, tokenizer)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise DispError(f"{path}: weights do not fit the stored config ({str(err).splitlines()[0][:120]})")
    return model.to(device).eval(), tokenizer, config, state
