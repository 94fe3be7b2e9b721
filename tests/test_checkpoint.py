"""Checkpoints: round trip, atomic writes, safe loading, clear errors."""

import os

import pytest
import torch

from disp.support import checkpoint, files
from disp.config import get_preset
from disp.support.errors import DispError
from disp.data.tokenizer import Tokenizer


class Payload:
    """An arbitrary Python object: unpickling it could run code, so it must be refused."""


def make(tmp_path, stage="clean"):
    config = get_preset("tiny")
    tokenizer = Tokenizer.build(["describe the image .", "a red circle"])
    config.model.patch_classes = [7, 4]
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
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        files.atomic_write(target, crash)
    assert target.read_text().strip().endswith("}") and '"good": 1' in target.read_text()
    assert sorted(os.listdir(tmp_path)) == ["results.json"]
