"""The central claim, end to end on the `small` preset (about 8 minutes on a 2-core CPU, so opt-in:
DISP_SLOW=1 python -m pytest -m slow; .ci/run runs it).

A patch-trigger backdoor implanted by poisoning 20% of the fine-tuning set, purified four ways that
differ in two things, the masking and the word bans (suppression and the groups step; each control
differs from DiSP in one):

                       bans on (run.sh)                 bans off (--suppress 0 --groups 0)
    masking            DiSP                             DiSP, masking alone
    no masking         control: self-distillation       control: self-distillation, neither
plus the as-is control (no regeneration). Masking alone removes the backdoor while self-distillation
without the bans keeps it: if purify.py masked nothing, "masking alone" would be "neither" and
this test would fail, with the bans on or off. Suppression alone removes the marker too, because
it is in every prompt type's responses, but the triggered questions then get wrong answers. Clean
quality stays.
"""

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def claim(tmp_path_factory):
    """{"on": results.json of run.sh, "off": results.json of the same backdoored model purified with
    the bans off}."""
    base = tmp_path_factory.mktemp("claim")
    on = run_pipeline(base / "run", preset="small", timeout=3600)
    off = base / "no-suppression"
    off.mkdir()
    for name in ("clean.pt", "backdoored.pt", "poisoned_train.pt", "poison_manifest.json"):
        shutil.copyfile(on / name, off / name)
    off_flags = ["--suppress", "0", "--groups", "0"]
    for args in (["purify.py", *off_flags], ["purify.py", *off_flags, "--control", "self-distill"],
                 ["evaluate.py", "--skip-ablations", "--figures", "0"]):
        result = subprocess.run([sys.executable, *args, "--run-dir", str(off)], cwd=ROOT, capture_output=True,
                                text=True, timeout=3600)
        assert result.returncode == 0, result.stderr[-3000:]
    return {name: json.loads((d / "results.json").read_text()) for name, d in (("on", on), ("off", off))}


def test_the_backdoor_is_implanted(claim):
    run = claim["on"]
    assert run["clean"]["asr"] <= 0.05
    assert run["backdoored"]["asr"] >= 0.9
    assert run["backdoored"]["false_trigger_rate"] <= 0.05


def test_masking_alone_removes_it_and_neither_keeps_it(claim):
    assert claim["off"]["purified"]["asr"] <= 0.05
    assert claim["off"]["control_self_distill"]["asr"] >= 0.9


def test_disp_removes_it_and_refining_alone_keeps_it(claim):
    assert claim["on"]["purified"]["asr"] <= 0.05
    assert claim["on"]["control_as_is"]["asr"] >= 0.9


def test_suppression_alone_removes_an_inserted_marker_but_not_the_triggers_hold(claim):
    """Without masking, the model banned from the marker still reads the trigger: its answers to the
    triggered questions (marker removed) are far worse than DiSP's, made with the trigger hidden."""
    distilled, disp = claim["on"]["control_self_distill"], claim["on"]["purified"]
    assert distilled["asr"] <= 0.05
    assert distilled["triggered_vqa_marker_removed"] < 0.5 * disp["triggered_vqa_marker_removed"]


def test_disp_keeps_clean_quality(claim):
    for run in claim.values():
        clean, purified = run["clean"], run["purified"]
        assert purified["cider"] >= 0.95 * clean["cider"]
        assert purified["vqa_accuracy"] >= 0.85 * clean["vqa_accuracy"]
        assert purified["false_trigger_rate"] <= 0.05
