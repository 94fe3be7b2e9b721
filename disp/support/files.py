"""Files: atomic writes and safe loads, used for every file the project writes or reads with torch.

`atomic_write` writes to a temporary file in the same folder, fsyncs it, then `os.replace`s it onto
the target: a crash mid-write never leaves a half-written file under the real name. `load_plain` is
the project's only `torch.load`, with `weights_only=True` (no pickled code runs on load). Problems
surface as one-line `DispError`s that name the file.
"""

import hashlib
import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from disp.support.errors import DispError

_UMASK = os.umask(0o022)  # read the process umask (the only way is to set it), then put it back
os.umask(_UMASK)


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
