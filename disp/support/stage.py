"""What every stage does around its one job, written once: the parent checkpoint, the resume point,
and the stage's files written as one unit.

    begin            the tiny preset's note; temp files that a killed process left behind are removed
    load_parent      the checkpoint a stage starts from, checked to be made with the run's data files
    resume_point     the interrupted run's state (--resume), checked to come from the same parent
    check_same_flags a resume with other flags is an error, not silently ignored
    write_outputs    the stage's files, then its checkpoint recording their sha256, renamed together

A run's checkpoints chain: each records {file name: sha256} of the files it was made from
(`made_from`), so a later stage refuses a file rewritten since or copied in from another run.
"""

from pathlib import Path

from disp.config import TINY_NOTE
from disp.support import checkpoint, distributed, files
from disp.support.errors import DispError


def begin(run_dir, preset: str):
    if preset == "tiny":
        print(TINY_NOTE)
    if distributed.is_main():
        files.remove_stale_temp_files(run_dir)


def load_parent(path, stage: str, run_dir, data_files=(), device="cpu"):
    """-> (model, tokenizer, config, state) of the `stage` checkpoint at `path`; each of `data_files`
    in run_dir must be the file the checkpoint was made from."""
    model, tokenizer, config, state = checkpoint.load(path, stages=[stage], device=device)
    checkpoint.check_made_from(state, path, run_dir, list(data_files))
    return model, tokenizer, config, state


def resume_point(path, stage: str, parent=None):
    """The resume point's state, or a one-line error. parent: (file name, its path) of the checkpoint
    this stage starts from; the resume point must have been made from that very file."""
    state = checkpoint.load_state(path, stages=[stage])
    if parent is not None:
        name, parent_path = parent
        if (state.get("made_from") or {}).get(name) != files.sha256(parent_path):
            raise DispError(f"{path} was made from another {parent_path} (rewritten since, or from another run); "
                            f"rerun without --resume")
    return state


def check_same_flags(path, stored: dict, given: dict):
    """given: {setting: value or None (flag not given)}, stored: the resume point's. A setting
    "backdoor.poison_rate" is the flag --poison-rate."""
    for key, value in given.items():
        if value is not None and value != stored[key]:
            flag = "--" + key.split(".")[-1].replace("_", "-")
            raise DispError(f"{path} was made with {flag} {stored[key]}, not {value}; resume with the same flags, "
                            f"or rerun without --resume")


def write_outputs(run_dir, outputs: dict, save_checkpoint, made_from: dict, recorded=(), resume_path=None):
    """Write a stage's files as one unit: each of `outputs` ({file name: write(path)}, a writer that
    writes atomically, as files.write_json does), then the checkpoint, `save_checkpoint(made_from)`,
    with the sha256 of the `recorded` files added to made_from. All are renamed into place together;
    then the resume point is removed."""
    run_dir = Path(run_dir)
    with files.one_unit():
        for name, write in outputs.items():
            write(run_dir / name)
        save_checkpoint({**made_from, **{name: files.sha256(run_dir / name) for name in recorded}})
    if resume_path is not None:
        Path(resume_path).unlink(missing_ok=True)
