"""Files: atomic writes and safe loads, used for every file the project writes or reads with torch.

`atomic_write` writes to a temporary file in the same folder, fsyncs it, then `os.replace`s it onto
the target: a crash mid-write never leaves a half-written file under the real name. `one_unit`
makes all the files of a stage one unit (all new or all old). `sha256` identifies a file by its
bytes. `load_plain` is the project's only `torch.load`, with `weights_only=True` (no pickled code
runs on load). Problems surface as one-line `DispError`s that name the file.
"""

import hashlib
import json
import os
import pickle
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from disp.support.errors import DispError

_UMASK = os.umask(0o022)  # read the process umask (the only way is to set it), then put it back
os.umask(_UMASK)


# While a `one_unit()` block runs: target path -> its written temp file, renamed when the block ends.
_staged = None


@contextmanager
def one_unit():
    """Make every atomic_write inside the block one unit: the temp files are all written first and
    renamed together at the end, so an error (a full disk, a bad value) leaves every old file as it
    was. Only a kill in the few microseconds of the renames could leave a mix; each stage's
    checkpoint records the sha256 of its data files, so the next stage detects it."""
    global _staged
    _staged = staged = {}
    try:
        yield
        _staged = None
        for path in list(staged):
            os.replace(staged.pop(path), path)
    finally:
        _staged = None
        for tmp in staged.values():  # not renamed: the block failed
            if os.path.exists(tmp):
                os.remove(tmp)


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path), then rename the temp file onto path (at the end of a one_unit block)."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise DispError(f"cannot write {path}: {path.parent} is a file, not a folder; check --run-dir")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        write_fn(tmp)
        with open(tmp, "rb") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        if _staged is not None:
            _staged[path] = tmp
            tmp = None
        else:
            os.replace(tmp, path)
    except OSError as err:  # no permission, disk full, a file where a folder should be: the old file stays
        raise DispError(f"cannot write {path} ({err.strerror or type(err).__name__}); "
                        f"check the folder, its permissions and the free space") from None
    except RuntimeError as err:  # torch.save reports a full disk as "PytorchStreamWriter failed writing file"
        reason = " ".join(str(err).split())[:100]
        raise DispError(f"cannot write {path} ({reason}); check the free space and the folder's permissions") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, data):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def save_text(path, text: str):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_tensors(path, data):
    """torch.save of tensors and plain data, atomically (load_plain reads it back)."""
    atomic_write(path, lambda tmp: torch.save(data, tmp))


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
                            f"check --run-dir or the flag that named the file")
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


def read_jsonl(path, what="file") -> list:
    """One JSON value per line, with a one-line error naming the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise DispError(f"{what} {path} does not exist; run the stage that writes it first")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise DispError(f"{what} {path}, line {number}, is not valid JSON; rerun the stage that writes it") from None
    return rows


_HASHES = {}


def sha256(path) -> str:
    """Hex sha256 of a file's bytes (cached per path, size and mtime: a stage hashes a file once).
    Inside a one_unit block, a file written there is hashed as it will be once renamed."""
    path = Path(path)
    if _staged is not None and path in _staged:
        path = Path(_staged[path])
    if not path.is_file():
        raise DispError(f"{path} does not exist; run the stage that writes it first")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def remove_stale_temp_files(folder) -> int:
    """Delete temp files that atomic_write left behind in `folder` when a process was killed (-9)
    mid-write; files of processes still running are kept. Returns how many were removed."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp") if Path(folder).is_dir() else ():
        match = re.fullmatch(r"\..+\.(\d+)\.[^.]+\.tmp", tmp.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
