"""Reliability: bad input ends in one line and changes nothing; atomic writes; safe loading;
bit-identical resume; same seed -> same results; a non-finite loss stops the run.

The bad-input table (CASES) runs each script's main(argv) in-process under `friendly_errors`
(tests.conftest.run_main), the same wrapper as `python SCRIPT.py ARGS`, without a subprocess's
seconds of imports per case. Every case gets a fresh copy of the tiny pipeline's run directory and
must leave every file in it (bytes and mtime) as it was, create nothing, and print exactly one line,
"error: ...", exit code 2. CASES, prepare() and fill() are plain data and functions, so a script can
also run every case as a real subprocess.
"""

import argparse
import ast
import hashlib
import importlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from disp.support import checkpoint, files
from disp.config import Config
from disp.data.dataset import VLDataset, load_dataset, save_dataset
from disp.data.readers import load_public
from disp.support.errors import DispError
from disp.data.tokenizer import Tokenizer
from tests.conftest import run_main, save_then_interrupt_at

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.*")  # its PNG codec, in fixtures


# ---------------------------------------------------------------------------------------------
# helpers shared by the tests and the table script
# ---------------------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict:
    """Every file and folder under `folder`: path -> (mtime_ns, sha256) or 'dir'."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rewrite_state(path: Path, edit: Callable[[dict], None], out: Optional[Path] = None):
    """Load a checkpoint / dataset file, edit its dict in place, save it (to `out` or back)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    edit(state)
    torch.save(state, out or path)


def other_run_checkpoint(src: Path, dst: Path, stage: str, finished=True):
    """A checkpoint as another run would have written it: same stage and extra, other model size."""
    state = checkpoint.load_state(src)
    config = Config.from_dict(state["config"])
    config.model.dim = 16
    tokenizer = Tokenizer.from_dict(state["tokenizer"])
    model = checkpoint.build_model(config, tokenizer)
    checkpoint.save(dst, stage=stage, model=model, config=config, tokenizer=tokenizer, finished=finished,
                    extra=state["extra"])


def write_png(path: Path, image: torch.Tensor):
    from torchvision.io import write_png as _write_png

    path.parent.mkdir(parents=True, exist_ok=True)
    _write_png(image, str(path))


def karpathy_layout(root: Path, edit_doc: Optional[Callable[[dict], object]] = None) -> Path:
    """A Karpathy-split folder: 5 small RGB images (train, train, restval, val, test), 2 captions each."""
    records = []
    for k, split in enumerate(["train", "train", "restval", "val", "test"]):
        write_png(root / "images" / "val2014" / f"{k}.png", torch.randint(0, 256, (3, 20 + k, 30), dtype=torch.uint8))
        records.append({"filepath": "val2014", "filename": f"{k}.png", "split": split,
                        "sentences": [{"raw": f"A red thing number {k}.", "tokens": ["a", "red", "thing", str(k)]},
                                      {"raw": "Some noise.", "tokens": ["some", "noise"]}]})
    doc = {"images": records}
    if edit_doc is not None:
        doc = edit_doc(doc) or doc
    (root / "dataset_coco.json").write_text(json.dumps(doc))
    return root


def _drop(record: dict, key: str) -> dict:
    record.pop(key)
    return record


# ---------------------------------------------------------------------------------------------
# the bad-input table
# ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    script: str
    args: list  # {run}: the copied run directory, {missing}: a folder that does not exist, {data}: a data folder
    message: str  # must appear in the one line (same placeholders)
    setup: Optional[Callable[[Path, Path], None]] = None  # setup(run, data)
    from_other_run: tuple = ()  # files copied from a second run (seed 1) before setup: name or (name, new name)


TRAIN_DATA = ["--preset", "tiny", "--data", "karpathy", "--data-root", "{data}", "--run-dir", "{run}"]
NOT_MADE_FROM = "{run}/%s is not the file {run}/%s was made from"


def _delete(name):
    return lambda run, data: (run / name).unlink()


def _copy(src, dst):
    return lambda run, data: shutil.copyfile(run / src, run / dst)


def _pickled_object(run, data):  # a checkpoint that also stores an argparse.Namespace, as many scripts do
    rewrite_state(run / "clean.pt", lambda s: s["extra"].update(args=argparse.Namespace(lr=1e-3)))


def _poisoned_set(edit):
    def setup(run, data):
        ds = load_dataset(run / "poisoned_train.pt")
        edited = edit(ds)  # a new dataset, or None after an edit in place
        save_dataset(run / "poisoned_train.pt", ds if edited is None else edited)
    return setup


CASES = [
    # --- missing run directory or checkpoint ---------------------------------------------------
    Case("train-resume-missing-dir", "train.py", ["--resume", "--run-dir", "{missing}"],
         "folder {missing} does not exist (looked for checkpoint clean.resume.pt there)"),
    Case("train-resume-nothing-to-resume", "train.py", ["--resume", "--run-dir", "{run}"],
         "no resume point {run}/clean.resume.pt"),
    Case("attack-missing-run-dir", "attack.py", ["--run-dir", "{missing}"], "folder {missing} does not exist"),
    Case("attack-missing-clean", "attack.py", ["--run-dir", "{run}"],
         "checkpoint {run}/clean.pt does not exist; run train.py first", _delete("clean.pt")),
    Case("attack-resume-nothing-to-resume", "attack.py", ["--run-dir", "{run}", "--resume"],
         "no resume point {run}/backdoored.resume.pt"),
    Case("purify-missing-run-dir", "purify.py", ["--run-dir", "{missing}"], "folder {missing} does not exist"),
    Case("purify-missing-backdoored", "purify.py", ["--run-dir", "{run}"],
         "checkpoint {run}/backdoored.pt does not exist; run attack.py first", _delete("backdoored.pt")),
    Case("purify-missing-poisoned-set", "purify.py", ["--run-dir", "{run}"],
         "dataset file {run}/poisoned_train.pt does not exist", _delete("poisoned_train.pt")),
    Case("evaluate-missing-manifest", "evaluate.py", ["--run-dir", "{run}"],
         "{run}/poison_manifest.json does not exist", _delete("poison_manifest.json")),
    Case("purify-resume-nothing-to-resume", "purify.py", ["--run-dir", "{run}", "--resume"],
         "no resume point {run}/purified.resume.pt"),
    Case("evaluate-missing-run-dir", "evaluate.py", ["--run-dir", "{missing}"], "folder {missing} does not exist"),
    Case("evaluate-missing-purified", "evaluate.py", ["--run-dir", "{run}"],
         "checkpoint {run}/purified.pt does not exist; run purify.py first", _delete("purified.pt")),
    Case("compare-missing-results", "experiments/compare_runs.py", ["--compare", "{run},{missing}"],
         "{missing}/results.json does not exist; run evaluate.py --run-dir {missing} first"),
    # --- a checkpoint of the wrong stage -------------------------------------------------------
    Case("purify-given-clean", "purify.py", ["--run-dir", "{run}"],
         "{run}/backdoored.pt is a 'clean' checkpoint, but this step needs one of: backdoored",
         _copy("clean.pt", "backdoored.pt")),
    Case("attack-given-backdoored", "attack.py", ["--run-dir", "{run}", "--clean-checkpoint", "{run}/backdoored.pt"],
         "{run}/backdoored.pt is a 'backdoored' checkpoint, but this step needs one of: clean"),
    Case("evaluate-given-control", "evaluate.py", ["--run-dir", "{run}"],
         "{run}/purified.pt is a 'control_as_is' checkpoint, but this step needs one of: purified",
         _copy("control_as_is.pt", "purified.pt")),
    Case("attack-old-format-clean", "attack.py", ["--run-dir", "{run}"],
         "{run}/clean.pt has checkpoint format 1 (written by an older disp); this code reads format 3",
         lambda run, data: rewrite_state(run / "clean.pt", lambda s: s.pop("format"))),
    Case("train-resume-given-backdoored", "train.py", ["--resume", "--run-dir", "{run}"],
         "{run}/clean.resume.pt is a 'backdoored' checkpoint, but this step needs one of: clean",
         _copy("backdoored.pt", "clean.resume.pt")),
    # --- corrupt, truncated or unsafe files ----------------------------------------------------
    Case("attack-truncated-clean", "attack.py", ["--run-dir", "{run}"],
         "checkpoint {run}/clean.pt is corrupt or truncated (RuntimeError)", lambda run, data: truncate(run / "clean.pt")),
    Case("attack-empty-clean", "attack.py", ["--run-dir", "{run}"],
         "checkpoint {run}/clean.pt is corrupt or truncated (EOFError)",
         lambda run, data: (run / "clean.pt").write_bytes(b"")),
    Case("purify-text-as-backdoored", "purify.py", ["--run-dir", "{run}"],
         "checkpoint {run}/backdoored.pt is corrupt or truncated",
         lambda run, data: (run / "backdoored.pt").write_text("not a checkpoint\n" * 20)),
    Case("evaluate-truncated-purified", "evaluate.py", ["--run-dir", "{run}"],
         "checkpoint {run}/purified.pt is corrupt or truncated", lambda run, data: truncate(run / "purified.pt")),
    Case("attack-pickled-object", "attack.py", ["--run-dir", "{run}"],
         "checkpoint {run}/clean.pt holds pickled objects (argparse.Namespace) and is refused for safety",
         _pickled_object),
    Case("purify-truncated-poisoned-set", "purify.py", ["--run-dir", "{run}"],
         "dataset file {run}/poisoned_train.pt is corrupt or truncated",
         lambda run, data: truncate(run / "poisoned_train.pt")),
    Case("purify-poisoned-set-missing-key", "purify.py", ["--run-dir", "{run}"],
         "{run}/poisoned_train.pt: sample 0 has no 'response' key",
         _poisoned_set(lambda ds: _drop(ds.samples[0], "response") and None)),
    Case("purify-empty-poisoned-set", "purify.py", ["--run-dir", "{run}"],
         "{run}/poisoned_train.pt holds no samples",
         _poisoned_set(lambda ds: VLDataset(ds.images, [], ds.patch_labels, ds.meta))),
    Case("evaluate-bad-manifest", "evaluate.py", ["--run-dir", "{run}"],
         NOT_MADE_FROM % ("poison_manifest.json", "backdoored.pt"),
         lambda run, data: (run / "poison_manifest.json").write_text('{"n_samples": 144, ')),
    Case("evaluate-corrupt-saliency", "evaluate.py", ["--run-dir", "{run}"],
         NOT_MADE_FROM % ("purified_saliency.pt", "purified.pt"),
         lambda run, data: (run / "purified_saliency.pt").write_text("garbage")),
    Case("compare-bad-results", "experiments/compare_runs.py", ["--compare", "{run}"],
         "results file {run}/results.json is not valid JSON",
         lambda run, data: (run / "results.json").write_text("{")),
    # --- files of different runs (a config mismatch between stages) ----------------------------
    Case("evaluate-purified-of-other-run", "evaluate.py", ["--run-dir", "{run}"],
         NOT_MADE_FROM % ("backdoored.pt", "purified.pt"), from_other_run=("purified.pt",)),
    Case("evaluate-purified-of-other-model-size", "evaluate.py", ["--run-dir", "{run}"],
         "{run}/purified.pt does not record which backdoored.pt it was made from; rerun purify.py",
         lambda run, data: other_run_checkpoint(run / "purified.pt", run / "purified.pt", "purified")),
    Case("evaluate-clean-of-other-run", "evaluate.py", ["--run-dir", "{run}"],
         NOT_MADE_FROM % ("clean.pt", "backdoored.pt"), from_other_run=("clean.pt",)),
    Case("evaluate-clean-deleted", "evaluate.py", ["--run-dir", "{run}"],
         "{run}/clean.pt does not exist", _delete("clean.pt")),
    Case("evaluate-clean-random-bytes", "evaluate.py", ["--run-dir", "{run}"],
         NOT_MADE_FROM % ("clean.pt", "backdoored.pt"), lambda run, data: (run / "clean.pt").write_bytes(b"\x07" * 999)),
    Case("evaluate-poisoned-set-of-other-run", "evaluate.py", ["--run-dir", "{run}"],
         NOT_MADE_FROM % ("poisoned_train.pt", "backdoored.pt"), from_other_run=("poisoned_train.pt",)),
    Case("evaluate-saliency-of-other-run", "evaluate.py", ["--run-dir", "{run}"],
         NOT_MADE_FROM % ("purified_saliency.pt", "purified.pt"), from_other_run=("purified_saliency.pt",)),
    Case("evaluate-control-of-other-run", "evaluate.py", ["--run-dir", "{run}"],
         NOT_MADE_FROM % ("backdoored.pt", "control_as_is.pt"), from_other_run=("control_as_is.pt",)),
    Case("purify-backdoored-of-other-run", "purify.py", ["--run-dir", "{run}"],
         NOT_MADE_FROM % ("poisoned_train.pt", "backdoored.pt"), from_other_run=("backdoored.pt",)),
    Case("purify-poisoned-set-of-other-run", "purify.py", ["--run-dir", "{run}"],
         NOT_MADE_FROM % ("poisoned_train.pt", "backdoored.pt"), from_other_run=("poisoned_train.pt",)),
    Case("evaluate-manifest-of-other-run", "evaluate.py", ["--run-dir", "{run}"],
         NOT_MADE_FROM % ("poison_manifest.json", "backdoored.pt"), from_other_run=("poison_manifest.json",)),
    Case("evaluate-purified-set-rewritten", "evaluate.py", ["--run-dir", "{run}"],
         NOT_MADE_FROM % ("control_self_distill_train.jsonl", "control_self_distill.pt"),
         lambda run, data: (run / "control_self_distill_train.jsonl").write_text("{}\n")),
    Case("attack-resume-of-other-clean", "attack.py", ["--run-dir", "{run}", "--resume"],
         "{run}/backdoored.resume.pt was made from another {run}/clean.pt",
         lambda run, data: shutil.copyfile(run / "backdoored.pt", run / "backdoored.resume.pt"),
         from_other_run=("clean.pt",)),
    Case("attack-other-clean-into-this-run", "attack.py", ["--run-dir", "{run}", "--clean-checkpoint", "{run}/s1.pt"],
         "{run}/clean.pt is another model than {run}/s1.pt; give a new --run-dir",
         from_other_run=(("clean.pt", "s1.pt"),)),
    Case("purify-resume-of-other-backdoored", "purify.py", ["--run-dir", "{run}", "--resume"],
         "{run}/purified.resume.pt was made from another {run}/backdoored.pt",
         lambda run, data: shutil.copyfile(run / "purified.pt", run / "purified.resume.pt"),
         from_other_run=("backdoored.pt", "poisoned_train.pt", "poison_manifest.json")),
    Case("purify-resume-other-flags", "purify.py", ["--run-dir", "{run}", "--resume", "--rule", "ratio"],
         "{run}/purified.resume.pt was made with --rule adaptive, not ratio", _copy("purified.pt", "purified.resume.pt")),
    Case("purify-poisoned-set-other-size", "purify.py", ["--run-dir", "{run}"],
         "{run}/poisoned_train.pt holds 32x32 px images, but the model expects 48x48",
         _poisoned_set(lambda ds: VLDataset(ds.images[:, :, :32, :32].clone(), ds.samples, None, ds.meta))),
    # --- ratios outside [0, 1] -----------------------------------------------------------------
    Case("attack-poison-rate", "attack.py", ["--run-dir", "{run}", "--poison-rate", "1.5"],
         "poison_rate must be in [0, 1], got 1.5"),
    Case("attack-poison-rate-nan", "attack.py", ["--run-dir", "{run}", "--poison-rate", "nan"],
         "poison_rate must be in [0, 1], got nan"),
    Case("attack-blend-alpha", "attack.py", ["--run-dir", "{run}", "--trigger", "blended", "--blend-alpha", "-0.2"],
         "blend_alpha must be in [0, 1], got -0.2"),
    Case("attack-patch-color", "attack.py", ["--run-dir", "{run}", "--patch-color", "red"],
         "--patch-color takes three numbers R,G,B such as 1,0,1, got 'red'"),
    Case("attack-curve-every", "attack.py", ["--run-dir", "{run}", "--curve-every", "-1"], "--curve-every must be >= 0"),
    Case("attack-sig-frequency", "attack.py", ["--run-dir", "{run}", "--trigger", "sig", "--sig-frequency", "0"],
         "sig_frequency must be > 0, got 0.0"),
    Case("attack-patch-too-large", "attack.py", ["--run-dir", "{run}", "--patch-size", "100"], "patch_size 100"),
    Case("purify-suppress-negative", "purify.py", ["--run-dir", "{run}", "--suppress", "-1"],
         "--suppress must be in [0, 1], got -1.0"),
    Case("purify-mask-ratio", "purify.py", ["--run-dir", "{run}", "--rule", "ratio", "--mask-ratio", "1.01"],
         "--mask-ratio must be in [0, 1], got 1.01"),
    Case("evaluate-mask-ratio", "evaluate.py", ["--run-dir", "{run}", "--mask-ratio", "2"],
         "--mask-ratio must be in [0, 1], got 2.0"),
    Case("evaluate-sweep-ratio", "evaluate.py", ["--run-dir", "{run}", "--sweep", "0,1.5"],
         "sweep ratio must be in [0, 1], got 1.5"),
    Case("evaluate-ablations-both-ways", "evaluate.py", ["--run-dir", "{run}", "--skip-ablations", "--ablations", "on"],
         "--skip-ablations and --ablations on contradict each other; give one"),
    Case("evaluate-sweep-not-a-number", "evaluate.py", ["--run-dir", "{run}", "--sweep", "0,abc"],
         "--sweep must be comma-separated numbers in [0, 1], got '0,abc'"),
    # --- counts and rates that make no sense, refused before any work ---------------------------
    Case("purify-batch-size-0", "purify.py", ["--run-dir", "{run}", "--batch-size", "0"], "--batch-size must be > 0, got 0"),
    Case("purify-epochs-negative", "purify.py", ["--run-dir", "{run}", "--epochs", "-2"], "--epochs must be > 0, got -2"),
    Case("purify-max-masked-negative", "purify.py", ["--run-dir", "{run}", "--max-masked", "-1"],
         "--max-masked must be > 0, got -1"),
    Case("purify-spectral-negative", "purify.py", ["--run-dir", "{run}", "--spectral", "-1"],
         "--spectral must be >= 0, got -1"),
    Case("purify-control-spectral", "purify.py", ["--run-dir", "{run}", "--control", "self-distill", "--spectral", "2"],
         "--spectral is DiSP's masking in feature space; the controls mask nothing"),
    Case("purify-groups-negative", "purify.py", ["--run-dir", "{run}", "--groups", "-3"],
         "--groups must be >= 0, got -3"),
    Case("purify-as-is-groups", "purify.py", ["--run-dir", "{run}", "--control", "as-is", "--groups", "8"],
         "--groups acts on regenerated responses; the control as-is regenerates none"),
    Case("purify-blur-negative", "purify.py", ["--run-dir", "{run}", "--blur", "-0.5"], "--blur must be >= 0, got -0.5"),
    Case("purify-as-is-blur", "purify.py", ["--run-dir", "{run}", "--control", "as-is", "--blur", "2"],
         "--blur acts on regenerated responses; the control as-is regenerates none"),
    Case("purify-lr-nan", "purify.py", ["--run-dir", "{run}", "--lr", "nan"], "--lr must be > 0, got nan"),
    Case("evaluate-figures-negative", "evaluate.py", ["--run-dir", "{run}", "--figures", "-1"], "--figures must be >= 0"),
    Case("purify-as-is-suppress", "purify.py", ["--run-dir", "{run}", "--control", "as-is", "--suppress", "0.1"],
         "--suppress acts on regenerated responses; the control as-is regenerates none"),
    Case("attack-finetune-images-negative", "attack.py", ["--run-dir", "{run}", "--finetune-images", "-3"],
         "--finetune-images must be > 0, got -3"),
    Case("attack-finetune-images-0", "attack.py", ["--run-dir", "{run}", "--finetune-images", "0"],
         "--finetune-images must be > 0, got 0"),
    Case("attack-lr-negative", "attack.py", ["--run-dir", "{run}", "--lr", "-1"], "--lr must be > 0, got -1.0"),
    Case("attack-lr-0", "attack.py", ["--run-dir", "{run}", "--lr", "0"], "--lr must be > 0, got 0.0"),
    Case("attack-epochs-0", "attack.py", ["--run-dir", "{run}", "--epochs", "0"], "--epochs must be > 0, got 0"),
    Case("attack-epochs-negative", "attack.py", ["--run-dir", "{run}", "--epochs", "-1"], "--epochs must be > 0, got -1"),
    Case("attack-eval-samples-0", "attack.py", ["--run-dir", "{run}", "--eval-samples", "0"],
         "--eval-samples must be > 0, got 0"),
    Case("train-sft-steps-0", "train.py", ["--preset", "tiny", "--run-dir", "{run}/new", "--sft-steps", "0"],
         "--sft-steps must be > 0, got 0"),
    Case("train-sft-steps-negative", "train.py", ["--preset", "tiny", "--run-dir", "{run}/new", "--sft-steps", "-1"],
         "--sft-steps must be > 0, got -1"),
    Case("train-resume-other-seed", "train.py", ["--run-dir", "{run}", "--resume", "--seed", "5"],
         "{run}/clean.resume.pt was made with --seed 0, not 5", _copy("clean.pt", "clean.resume.pt")),
    Case("evaluate-ablation-samples-negative", "evaluate.py", ["--run-dir", "{run}", "--ablation-samples", "-5"],
         "--ablation-samples must be > 0, got -5"),
    Case("evaluate-eval-samples-0", "evaluate.py", ["--run-dir", "{run}", "--eval-samples", "0"],
         "--eval-samples must be > 0, got 0"),
    # --- unknown names -------------------------------------------------------------------------
    Case("train-preset", "train.py", ["--preset", "huge", "--run-dir", "{run}"], "unknown preset 'huge'"),
    Case("train-data", "train.py", ["--preset", "tiny", "--data", "imagenet", "--run-dir", "{run}"],
         "unknown --data 'imagenet'"),
    Case("attack-trigger", "attack.py", ["--run-dir", "{run}", "--trigger", "laser"], "unknown trigger 'laser'"),
    Case("attack-target", "attack.py", ["--run-dir", "{run}", "--target", "bomb"], "unknown target 'bomb'"),
    Case("attack-trainable", "attack.py", ["--run-dir", "{run}", "--trainable", "vit"], "unknown --trainable 'vit'"),
    Case("attack-device", "attack.py", ["--run-dir", "{run}", "--device", "tpu"], "unknown --device 'tpu'"),
    Case("purify-saliency", "purify.py", ["--run-dir", "{run}", "--saliency", "gradcam"],
         "unknown --saliency 'gradcam'"),
    Case("purify-rule", "purify.py", ["--run-dir", "{run}", "--rule", "magic"], "unknown --rule 'magic'"),
    Case("purify-masking", "purify.py", ["--run-dir", "{run}", "--masking", "pixels"], "unknown --masking 'pixels'"),
    Case("purify-regenerate", "purify.py", ["--run-dir", "{run}", "--regenerate", "some"], "unknown --regenerate 'some'"),
    Case("purify-control-regenerate", "purify.py", ["--run-dir", "{run}", "--control", "self-distill", "--regenerate",
                                                    "masked"], "--regenerate masked keeps every response that DiSP's"),
    Case("purify-control", "purify.py", ["--run-dir", "{run}", "--control", "nothing"],
         "unknown --control 'nothing'"),
    # --- public dataset files on disk (train.py --data karpathy) -------------------------------
    Case("data-root-missing", "train.py", ["--preset", "tiny", "--data", "karpathy", "--data-root", "{missing}",
                                           "--run-dir", "{run}"],
         "data root {missing} does not exist or is not a folder"),
    Case("data-root-not-given", "train.py", ["--preset", "tiny", "--data", "coco", "--run-dir", "{run}"],
         "--data coco needs --data-root"),
    Case("data-bad-json", "train.py", TRAIN_DATA, "{data}/dataset_coco.json is not valid JSON (line 1)",
         lambda run, data: (karpathy_layout(data) / "dataset_coco.json").write_text('{"images": [')),
    Case("data-empty-json", "train.py", TRAIN_DATA, "{data}/dataset_coco.json is not valid JSON (line 1)",
         lambda run, data: (karpathy_layout(data) / "dataset_coco.json").write_text("")),
    Case("data-not-an-object", "train.py", TRAIN_DATA,
         "{data}/dataset_coco.json: expected a JSON object with a 'images' list at the top",
         lambda run, data: karpathy_layout(data, lambda doc: doc["images"])),
    Case("data-missing-key", "train.py", TRAIN_DATA, "{data}/dataset_coco.json: image 1 has no 'filename' key",
         lambda run, data: karpathy_layout(data, lambda doc: _drop(doc["images"][1], "filename") and None)),
    Case("data-missing-image", "train.py", TRAIN_DATA,
         "image file {data}/images/val2014/1.png (named in {data}/dataset_coco.json split 'train') does not exist",
         lambda run, data: (karpathy_layout(data) / "images" / "val2014" / "1.png").unlink()),
    Case("data-corrupt-image", "train.py", TRAIN_DATA, "image {data}/images/val2014/0.png could not be decoded",
         lambda run, data: (karpathy_layout(data) / "images" / "val2014" / "0.png").write_bytes(b"\x89PNG broken")),
    Case("data-no-samples", "train.py", TRAIN_DATA, "holds no samples",
         lambda run, data: karpathy_layout(data, lambda doc: {"images": []})),
]


def fill(text: str, run: Path, data: Path, missing: Path) -> str:
    return text.replace("{run}", str(run)).replace("{data}", str(data)).replace("{missing}", str(missing))


def prepare(case: Case, base: Path, tmp: Path, other: Path) -> tuple:
    """A fresh copy of the run directory, the case's setup applied: (run, data, missing)."""
    run, data, missing = tmp / "run", tmp / "data", tmp / "no-such-dir"
    shutil.copytree(base, run)
    for name in case.from_other_run:
        src, dst = name if isinstance(name, tuple) else (name, name)
        shutil.copyfile(other / src, run / dst)
    if case.setup is not None:
        case.setup(run, data)
    return run, data, missing


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(case, tiny_pipeline, other_tiny_pipeline, tmp_path):
    run, data, missing = prepare(case, tiny_pipeline, tmp_path, other_tiny_pipeline)
    before = snapshot(tmp_path)
    code, stderr = run_main(case.script, [fill(a, run, data, missing) for a in case.args])
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    assert fill(case.message, run, data, missing) in lines[0]
    assert snapshot(tmp_path) == before  # no file changed, none created (no temp file left either)


def test_non_rgb_and_odd_sized_images_are_converted(tmp_path):
    """Grayscale and RGBA PNGs of any size come out RGB uint8 at the model's size."""
    import matplotlib.pyplot as plt
    import numpy as np

    root = karpathy_layout(tmp_path / "data")
    folder = root / "images" / "val2014"
    write_png(folder / "0.png", torch.full((1, 17, 40), 200, dtype=torch.uint8))  # grayscale, not square
    plt.imsave(folder / "1.png", np.full((30, 25, 4), 0.5, dtype=np.float32))  # RGBA
    train = load_public("karpathy", root, "train", 48)
    assert train.images.shape == (3, 3, 48, 48) and train.images.dtype == torch.uint8
    gray = train.images[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2]) and int(gray[0, 5, 5]) == 200


def test_prompt_outside_the_vocabulary_gives_unk_not_a_crash(tiny_pipeline):
    from disp.evaluation import generate_responses

    model, tokenizer, config, _ = checkpoint.load(tiny_pipeline / "clean.pt", stages=["clean"])
    ids = tokenizer.encode("What is the zorblax [MASK] [EOS] ?")
    assert ids[3:6] == [tokenizer.unk_id] * 3  # typed "[MASK]" / "[EOS]" are unknown words, not specials
    assert tokenizer.unk_id not in ids[:3] + ids[6:]
    assert tokenizer.decode([tokenizer.unk_id, tokenizer.eos_id]) == "[UNK]"
    prompts = ["what colour is the zorblax ?", "", "qwerty " * 40, "DESCRIBE the image ."]
    data = load_dataset(tiny_pipeline / "poisoned_train.pt")
    dataset = VLDataset(data.images[:1], [{"image": 0, "task": "vqa", "prompt": p, "response": "", "answers": []}
                                          for p in prompts])
    outputs = generate_responses(model, tokenizer, dataset)
    assert len(outputs) == len(prompts) and all(isinstance(o, str) for o in outputs)


# ---------------------------------------------------------------------------------------------
# atomic writes, safe loading
# ---------------------------------------------------------------------------------------------

def _project_sources():
    skip = {"tests", "runs", ".git", ".venv", "venv", "build"}
    return [p for p in sorted(ROOT.rglob("*.py")) if not skip & set(p.relative_to(ROOT).parts)]


def _call_name(node: ast.Call) -> str:
    return ast.unparse(node.func)


def test_every_torch_load_uses_weights_only():
    calls = []
    for path in _project_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and _call_name(node) == "torch.load":
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", ok))
    assert calls, "no torch.load found: has the loader moved?"
    assert all(ok for _, ok in calls), [where for where, ok in calls if not ok]


def non_atomic_writes(source: str) -> list:
    """Write calls in `source` whose target is not the `tmp` that atomic_write hands its callback:
    torch.save, savefig, write_text / write_bytes, open(..., 'w' / 'a' / 'x')."""
    def is_tmp(expr):
        if isinstance(expr, ast.Call) and _call_name(expr) in ("Path", "pathlib.Path") and expr.args:
            expr = expr.args[0]
        return isinstance(expr, ast.Name) and expr.id == "tmp"

    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        if name == "torch.save":
            target = node.args[1] if len(node.args) > 1 else None
        elif name.endswith(".savefig"):
            target = node.args[0] if node.args else None
        elif name.endswith((".write_text", ".write_bytes")):
            target = node.func.value
        elif name == "open" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and \
                any(c in str(node.args[1].value) for c in "wax"):
            target = node.args[0]
        else:
            continue
        if target is None or not is_tmp(target):
            found.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_every_file_write_goes_through_atomic_write():
    """Every checkpoint, dataset, results and figure file is written to a temp file and renamed."""
    assert len(non_atomic_writes('torch.save(s, path)\nPath(out).write_text(t)\nopen(p, "w")\nfig.savefig(p)')) == 4
    assert not non_atomic_writes('atomic_write(p, lambda tmp: torch.save(s, tmp))\nPath(tmp).write_text(t)')
    offenders = {str(path.relative_to(ROOT)): non_atomic_writes(path.read_text()) for path in _project_sources()}
    assert not {k: v for k, v in offenders.items() if v}


def test_atomic_write_keeps_the_usual_permissions(tmp_path):
    import os

    files.write_json(tmp_path / "a.json", {"x": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_unwritable_target_is_a_one_line_error(tmp_path):
    """A file where the run folder should be (or no permission, or a full disk) ends in DispError."""
    (tmp_path / "run").write_text("a file, not a folder")
    with pytest.raises(DispError, match=r"cannot write .*run/results.json: .*run is a file, not a folder"):
        files.write_json(tmp_path / "run" / "results.json", {"x": 1})
    with pytest.raises(DispError, match=r"cannot write .*run/sub/results.json \(Not a directory\)"):
        files.write_json(tmp_path / "run" / "sub" / "results.json", {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_garbage_file_is_corrupt_not_unsafe(tmp_path):
    """Random bytes must not be reported as a pickled object (and must not escape as a KeyError)."""
    for i, data in enumerate([b"not a checkpoint\n" * 20, bytes(range(256)) * 8, b'{"a": 1}']):
        path = tmp_path / f"{i}.pt"
        path.write_bytes(data)
        with pytest.raises(DispError, match="is corrupt or truncated"):
            checkpoint.load(path)


# ---------------------------------------------------------------------------------------------
# resume and reproducibility: a second pipeline (seed 0), attack and purify interrupted and resumed
# ---------------------------------------------------------------------------------------------

def interrupted_then_resumed(script: str, argv: list, resume_file: Path, final_file: Path, step: int = 10):
    """Run `script`, raise KeyboardInterrupt (as Ctrl-C would) right after the step-`step` resume
    checkpoint is written, then rerun it with --resume."""
    module = importlib.import_module(Path(script).stem)
    save_then_interrupt = save_then_interrupt_at(step)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            module.main(argv)
    assert resume_file.exists() and not final_file.exists()
    assert checkpoint.load_state(resume_file)["step"] == step
    code, stderr = run_main(script, argv + ["--resume"])
    assert code == 0, stderr[-2000:]
    assert final_file.exists() and not resume_file.exists()


@pytest.fixture(scope="module")
def rerun(tmp_path_factory):
    return tmp_path_factory.mktemp("rerun")


@pytest.fixture(scope="module")
def rerun_clean(rerun):
    code, stderr = run_main("train.py", ["--preset", "tiny", "--run-dir", str(rerun), "--seed", "0"])
    assert code == 0, stderr[-2000:]
    return rerun


@pytest.fixture(scope="module")
def rerun_attack(rerun_clean):
    interrupted_then_resumed("attack.py", ["--run-dir", str(rerun_clean), "--seed", "0"],
                             rerun_clean / "backdoored.resume.pt", rerun_clean / "backdoored.pt")
    return rerun_clean


@pytest.fixture(scope="module")
def rerun_purify(rerun_attack):
    interrupted_then_resumed("purify.py", ["--run-dir", str(rerun_attack), "--seed", "0"],
                             rerun_attack / "purified.resume.pt", rerun_attack / "purified.pt")
    return rerun_attack


@pytest.fixture(scope="module")
def rerun_results(rerun_purify):
    run_dir = ["--run-dir", str(rerun_purify)]
    for script, argv in (("purify.py", run_dir + ["--seed", "0", "--control", "self-distill"]),
                         ("purify.py", run_dir + ["--seed", "0", "--control", "as-is"]),
                         ("evaluate.py", run_dir)):  # as run.sh does
        code, stderr = run_main(script, argv)
        assert code == 0, stderr[-2000:]
    return rerun_purify


def assert_same_weights(a: Path, b: Path):
    wa, wb = checkpoint.load_state(a)["model"], checkpoint.load_state(b)["model"]
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def json_without(path: Path, *drop) -> dict:
    """A JSON file with the named keys removed (dotted paths: 'attack.minutes_training')."""
    data = json.loads(path.read_text())
    for key in drop:
        *parents, last = key.split(".")
        node = data
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return data


def test_attack_resume_is_bit_identical(rerun_attack, tiny_pipeline):
    assert_same_weights(rerun_attack / "backdoored.pt", tiny_pipeline / "backdoored.pt")
    drop = ("minutes_training",)  # wall time
    assert json_without(rerun_attack / "attack_metrics.json", *drop) == \
        json_without(tiny_pipeline / "attack_metrics.json", *drop)
    assert (rerun_attack / "poison_manifest.json").read_text() == (tiny_pipeline / "poison_manifest.json").read_text()
    ours, theirs = load_dataset(rerun_attack / "poisoned_train.pt"), load_dataset(tiny_pipeline / "poisoned_train.pt")
    assert torch.equal(ours.images, theirs.images) and ours.samples == theirs.samples


def test_purify_resume_is_bit_identical(rerun_purify, tiny_pipeline):
    assert_same_weights(rerun_purify / "purified.pt", tiny_pipeline / "purified.pt")
    assert json_without(rerun_purify / "purified_report.json", "timings") == \
        json_without(tiny_pipeline / "purified_report.json", "timings")
    assert (rerun_purify / "purified_train.jsonl").read_text() == (tiny_pipeline / "purified_train.jsonl").read_text()
    # (.pt bytes differ: torch.save names the archive after the temp file; the tensors must not)
    assert torch.equal(files.load_plain(rerun_purify / "purified_saliency.pt"),
                       files.load_plain(tiny_pipeline / "purified_saliency.pt"))


def test_same_seed_gives_the_same_results(rerun_results, tiny_pipeline):
    """A second run of the whole pipeline with seed 0 (its attack and purification interrupted and
    resumed on the way) writes the same clean model and the same results.json, timing aside."""
    assert_same_weights(rerun_results / "clean.pt", tiny_pipeline / "clean.pt")
    assert json_without(rerun_results / "clean_metrics.json", "metrics.minutes") == \
        json_without(tiny_pipeline / "clean_metrics.json", "metrics.minutes")
    ours, theirs = (json_without(d / "results.json", "minutes") for d in (rerun_results, tiny_pipeline))
    assert ours == theirs


# ---------------------------------------------------------------------------------------------
# a non-finite loss stops the run
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script,stage,step", [("train.py", "vision pretraining", 4), ("train.py", "clean SFT", 13),
                                               ("attack.py", "attack fine-tuning", 5)])
def test_nan_loss_stops_with_its_step_and_writes_no_checkpoint(script, stage, step, tiny_pipeline, tmp_path,
                                                               monkeypatch):
    """Training diverges: right after the update before `step`, every trained weight turns NaN, so the
    loss at `step` is NaN. The run must stop there, name the step and write no final checkpoint; the
    attack runs in a copy of a finished run, whose files must all stay as they were."""
    from disp.config import get_preset

    updates_before = step + (get_preset("tiny").train.vision_steps if stage == "clean SFT" else 0)
    real_step, calls = torch.optim.AdamW.step, []

    def diverging_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == updates_before:
            with torch.no_grad():
                for group in self.param_groups:
                    for param in group["params"]:
                        param.fill_(math.nan)
        return out

    run = tmp_path / "run"
    if script == "attack.py":
        shutil.copytree(tiny_pipeline, run)
    before = snapshot(tmp_path)
    monkeypatch.setattr(torch.optim.AdamW, "step", diverging_step)
    code, stderr = run_main(script, ["--preset", "tiny", "--run-dir", str(run)] if script == "train.py" else
                            ["--run-dir", str(run), "--seed", "0"])
    lines = stderr.strip().splitlines()  # progress bars, then the one-line error (no traceback)
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    assert lines[-1] == (f"error: {stage}: loss became nan at step {step}; no checkpoint was written for it "
                         f"(lower the learning rate or check the data)")
    if script == "attack.py":
        assert snapshot(tmp_path) == before  # backdoored.pt, the poisoned set, the metrics: all untouched
    elif stage == "clean SFT":  # no final files; the resume point before the bad step is intact and finite
        assert not (run / "clean.pt").exists() and not (run / "clean_metrics.json").exists()
        state = checkpoint.load_state(run / "clean.resume.pt")
        assert state["step"] == 10 and all(torch.isfinite(t).all() for t in state["model"].values())
    else:
        assert not run.exists() or not any(run.iterdir())  # nothing written at all


# ---------------------------------------------------------------------------------------------
# a stage's files are one unit; interruptions say what was kept; a run directory can move
# ---------------------------------------------------------------------------------------------

def test_a_crash_between_the_renames_leaves_a_mix_that_purify_refuses(tiny_pipeline, tmp_path, monkeypatch):
    """attack.py dies right after the new poisoned_train.pt is renamed into place (as kill -9 would
    there), next to the old backdoored.pt: purify.py must refuse the mix, not run on it."""
    import disp.support.files as files_module

    run = tmp_path / "run"
    shutil.copytree(tiny_pipeline, run)
    real_replace = files_module.os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if Path(dst).name == "poisoned_train.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(files_module.os, "replace", replace_then_die)
    code, _ = run_main("attack.py", ["--run-dir", str(run), "--poison-rate", "0.3"])
    monkeypatch.setattr(files_module.os, "replace", real_replace)
    assert code == 130
    assert files.sha256(run / "backdoored.pt") == files.sha256(tiny_pipeline / "backdoored.pt")  # the old one
    assert files.sha256(run / "poisoned_train.pt") != files.sha256(tiny_pipeline / "poisoned_train.pt")  # the new
    code, stderr = run_main("purify.py", ["--run-dir", str(run)])
    assert code == 2 and f"{run}/poisoned_train.pt is not the file {run}/backdoored.pt was made from" in stderr


def test_interrupt_messages_say_what_was_saved(tmp_path, monkeypatch):
    import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "vision_phase", interrupted)  # Ctrl-C before any resume point
    code, stderr = run_main("train.py", ["--preset", "tiny", "--run-dir", str(tmp_path / "a")])
    assert code == 130 and "nothing was saved" in stderr and "--resume" not in stderr
    monkeypatch.undo()

    monkeypatch.setattr(checkpoint, "save", save_then_interrupt_at(10))
    code, stderr = run_main("train.py", ["--preset", "tiny", "--run-dir", str(tmp_path / "b")])
    assert code == 130
    assert f"the resume point {tmp_path / 'b' / 'clean.resume.pt'} is intact; rerun with --resume" in stderr


def test_stale_temp_files_are_removed_by_the_next_stage(tiny_pipeline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_pipeline, run)
    stale = run / ".backdoored.pt.999999999.x1y2z3.tmp"  # left by a killed process
    stale.write_bytes(b"half a checkpoint")
    code, stderr = run_main("attack.py", ["--run-dir", str(run)])
    assert code == 0, stderr[-2000:]
    assert not stale.exists() and not list(run.glob(".*.tmp"))


def test_evaluate_works_from_another_directory_and_after_a_move(tiny_pipeline, tmp_path):
    """A relative --run-dir from another working directory, in a run directory copied elsewhere; with
    --skip-ablations the old sweep.png goes (it would not match results.md) and is not announced."""
    import subprocess
    import sys

    moved = tmp_path / "elsewhere" / "moved-run"
    shutil.copytree(tiny_pipeline, moved)
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--run-dir", "moved-run", "--skip-ablations"],
                            cwd=moved.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (moved / "sweep.png").exists() and "sweep.png" not in result.stdout.splitlines()[-1]
    ours = json.loads((moved / "results.json").read_text())
    theirs = json.loads((tiny_pipeline / "results.json").read_text())
    assert ours["purified"] == theirs["purified"] and ours["clean"] == theirs["clean"]


def test_a_full_disk_at_the_last_write_leaves_every_file_of_the_stage_as_it_was(tiny_pipeline, tmp_path, monkeypatch):
    """purify.py's checkpoint is its last write; a full disk there (torch.save's error, stubbed) must
    not leave the new saliency scores and purified set next to the old model."""
    run = tmp_path / "run"
    shutil.copytree(tiny_pipeline, run)
    before = snapshot(tmp_path)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if ".purified.pt." in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    code, stderr = run_main("purify.py", ["--run-dir", str(run)])
    lines = stderr.strip().splitlines()
    assert code == 2 and lines[-1].startswith(f"error: cannot write {run}/purified.pt (") and "Traceback" not in stderr
    after = snapshot(tmp_path)
    assert {k: after[k] for k in before} == before  # every file that existed is as it was
    assert set(after) - set(before) == {"run/purified.resume.pt"}  # only the resume point: free space, --resume
