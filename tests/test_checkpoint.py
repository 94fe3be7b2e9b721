"""Checkpoints: round trip, atomic writes, safe loading, clear errors."""

import os
from pathlib import Path

import pytest
import torch

from disp.config import get_preset, with_vocabulary
from disp.data.tokenizer import Tokenizer
from disp.support import checkpoint, files
from disp.support.errors import DispError


class Payload:
    """An arbitrary Python object: unpickling it could run code, so it must be refused."""


def make(tmp_path, stage="clean"):
    tokenizer = Tokenizer.build(["describe the image .", "a red circle"])
    config = with_vocabulary(get_preset("tiny"), len(tokenizer), [7, 4])
    model = checkpoint.build_model(config, tokenizer)
    path = tmp_path / f"{stage}.pt"
    checkpoint.save(path, stage=stage, model=model, config=config, tokenizer=tokenizer, step=3)
    return path, model


def test_round_trip_restores_weights_config_and_tokenizer(tmp_path):
    path, model = make(tmp_path)
    loaded, tokenizer, config, state = checkpoint.load(path, stages=["clean"])
    assert state["step"] == 3 and state["finished"] and config.preset == "tiny"
    assert "<backdoor>" in tokenizer.words  # reserved for the attack stage
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temp file left behind


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(DispError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.pt")


def test_wrong_stage_is_refused(tmp_path):
    path, _ = make(tmp_path, stage="clean")
    with pytest.raises(DispError, match="is a 'clean' checkpoint, but this step needs one of: backdoored"):
        checkpoint.load(path, stages=["backdoored"])


def test_truncated_checkpoint_is_refused(tmp_path):
    path, _ = make(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DispError, match="corrupt or truncated"):
        checkpoint.load(path)


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"stage": "clean", "model": {}, "config": {}, "tokenizer": Payload()}, path)
    with pytest.raises(DispError, match="pickled objects"):
        checkpoint.load(path)


def test_failed_write_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "results.json"
    files.write_json(target, {"good": 1})

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write("{half")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(target, crash)
    assert target.read_text().strip().endswith("}") and '"good": 1' in target.read_text()
    assert sorted(os.listdir(tmp_path)) == ["results.json"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                                                "failed writing file data/0: file write failed")])
def test_full_disk_during_a_write_is_one_line_and_keeps_the_old_file(tmp_path, error):
    """A writer that fails as torch.save or open() do on a full disk: DispError, old file intact, no temp file."""
    target = tmp_path / "clean.pt"
    target.write_bytes(b"old")

    def full_disk(tmp):
        Path(tmp).write_bytes(b"part")
        raise error

    with pytest.raises(DispError, match=r"cannot write .*clean.pt \(.*\); check") as caught:
        files.atomic_write(target, full_disk)
    assert "\n" not in str(caught.value)
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["clean.pt"]


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / ".clean.pt.999999999.abc123.tmp"  # no such pid
    alive = tmp_path / f".clean.pt.{os.getpid()}.abc123.tmp"
    other = tmp_path / "notes.tmp"
    for p in (dead, alive, other):
        p.write_text("x")
    assert files.remove_stale_temp_files(tmp_path) == 1
    assert not dead.exists() and alive.exists() and other.exists()


def test_made_from_names_both_files(tmp_path):
    path, _ = make(tmp_path)
    (tmp_path / "data.pt").write_bytes(b"one")
    state = checkpoint.load_state(path)
    state["made_from"] = {"data.pt": files.sha256(tmp_path / "data.pt")}
    checkpoint.check_made_from(state, path, tmp_path, ["data.pt"])  # the same bytes: accepted
    (tmp_path / "data.pt").write_bytes(b"two")
    with pytest.raises(DispError, match=r"data.pt is not the file .*clean.pt was made from"):
        checkpoint.check_made_from(state, path, tmp_path, ["data.pt"])
