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

import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from disp.config import Config
from disp.errors import DispError
from disp.model import DiffusionVLM
from disp.tokenizer import Tokenizer

_UMASK = os.umask(0o022)  # read the process umask (the only way is to set it), then put it back
os.umask(_UMASK)
# 2: the image+prompt prefix no longer attends to the response (model.py); 1 (no key): it did.
FORMAT = 2
# Which script writes a stage's checkpoint, for "run X first" hints.
STAGE_SCRIPTS = {"clean": "train.py", "backdoored": "attack.py", "purified": "purify.py",
                 "control_self_distill": "purify.py --control self-distill",
                 "control_as_is": "purify.py --control as-is"}


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path), then rename the temp file onto path."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise DispError(f"cannot write {path}: {path.parent} is a file, not a folder; check --run-dir / --out-dir")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write_fn(tmp)
        with open(tmp, "rb") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except OSError as err:  # no permission, disk full, a file where a folder should be: the old file stays
        raise DispError(f"cannot write {path} ({err.strerror or type(err).__name__}); "
                        f"check the folder, its permissions and the free space") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, data):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


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


def load_plain(path, what="checkpoint"):
    """torch.load(weights_only=True) with one-line errors: missing, pickled objects, corrupt.

    The only torch.load of the project: checkpoints, dataset files and saliency scores all come here.
    """
    path = Path(path)
    if path.is_dir():
        raise DispError(f"{what} {path} is a folder, not a file; give the file's path")
    if not path.is_file():
        if not path.parent.is_dir():
            raise DispError(f"folder {path.parent} does not exist (looked for {what} {path.name} there); "
                            f"check --run-dir / --out-dir")
        raise DispError(f"{what} {path} does not exist; run the stage that writes it first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types on a damaged file (KeyError on text)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if isinstance(err, pickle.UnpicklingError) and found:
            raise DispError(f"{what} {path} holds pickled objects ({found.group(1)}) and is refused for safety: "
                            f"only tensors and plain data load (weights_only=True)") from None
        raise DispError(f"{what} {path} is corrupt or truncated ({type(err).__name__}); "
                        f"delete it and rerun the stage that writes it") from None


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


def read_json(path, what="file", keys=()):
    """A JSON object from a file, with one-line errors (missing, not JSON, missing keys)."""
    path = Path(path)
    if not path.is_file():
        raise DispError(f"{what} {path} does not exist; run the stage that writes it first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DispError(f"{what} {path} is not valid JSON ({err.__class__.__name__}: "
                        f"{getattr(err, 'msg', err)}); rerun the stage that writes it") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise DispError(f"{what} {path} has no '{missing[0]}' key; rerun the stage that writes it")
    return data


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
