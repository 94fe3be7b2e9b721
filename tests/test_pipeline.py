"""The four scripts end to end on the tiny preset (run.sh), and their results files.

The run.sh run itself is the session fixture `tiny_pipeline` in conftest.py (shared with test_reliability.py).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from disp.support import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_wrote_its_artifacts(tiny_pipeline):
    for name in ("clean.pt", "backdoored.pt", "purified.pt", "control_self_distill.pt", "control_as_is.pt",
                 "poisoned_train.pt", "poison_manifest.json", "attack_metrics.json", "purified_train.jsonl",
                 "purified_report.json", "purified_saliency.png", "results.json", "results.md", "sweep.png",
                 "examples.png", "denoising.png"):
        assert (tiny_pipeline / name).exists(), name
    assert not list(tiny_pipeline.glob("*.resume.pt")) and not list(tiny_pipeline.glob("*.tmp"))
    for name, stage in (("clean", "clean"), ("backdoored", "backdoored"), ("purified", "purified")):
        assert checkpoint.load_state(tiny_pipeline / f"{name}.pt")["stage"] == stage


def test_results_json_has_the_keys_in_range(tiny_pipeline):
    results = json.loads((tiny_pipeline / "results.json").read_text())
    for stage in ("clean", "backdoored", "purified"):
        for key in ("asr", "false_trigger_rate", "bleu4", "vqa_accuracy"):
            assert 0.0 <= results[stage][key] <= 1.0, (stage, key)
        assert 0.0 <= results[stage]["cider"] <= 10.0
    for key in ("trigger", "target", "poison_rate", "mask_ratio", "saliency", "seed"):
        assert key in results["config"]
    assert 0.0 <= results["blind"]["vqa_accuracy"] <= 1.0  # the clean model with every vision token masked
    assert 0.0 <= results["majority_answer"]["vqa_accuracy"] <= 1.0
    assert results["config"]["trigger"] == "patch" and results["config"]["poison_rate"] == 0.2
    assert any(k.startswith("test-time CleanSight") for k in results["test_time_defences"])
    # what each purification did, scored against the manifest: as-is changes nothing, masks nothing
    assert set(results["detection"]) == {"purified", "control_self_distill", "control_as_is"}
    for found in results["detection"].values():
        assert all(0 <= found[k] <= 1 for k in ("precision", "recall", "trigger_sample_masked_rate",
                                                 "clean_sample_masked_rate"))
    assert results["detection"]["control_as_is"]["n_changed"] == 0
    assert results["detection"]["control_self_distill"]["trigger_sample_masked_rate"] == 0
    sweep = results["sweep"]
    assert set(sweep) == {"kl", "random"}
    # at ratio 0 nothing is masked, whatever the selection method
    assert sweep["kl"]["ratio"][0] == 0.0
    assert sweep["kl"]["asr"][0] == sweep["random"]["asr"][0]
    assert sweep["kl"]["vqa_accuracy"][0] == sweep["random"]["vqa_accuracy"][0]
    # ...and equals the unmasked evaluation of the backdoored model (the tiny test set is smaller than
    # --ablation-samples, so the sweep and the main rows see the same samples)
    for key in ("asr", "vqa_accuracy", "cider"):
        assert sweep["kl"][key][0] == results["backdoored"][key], key


def test_the_clean_models_captions_are_written_and_counted(tiny_pipeline):
    rows = [json.loads(line) for line in (tiny_pipeline / "captions_clean.jsonl").read_text().splitlines()]
    results = json.loads((tiny_pipeline / "results.json").read_text())
    assert rows and all(set(r) == {"image", "references", "output"} and r["references"] for r in rows)
    assert len({r["image"] for r in rows}) == len(rows)  # one caption per test image
    assert results["clean"]["distinct_captions"] == len({r["output"] for r in rows})


def test_purified_dataset_is_readable_and_complete(tiny_pipeline):
    rows = [json.loads(line) for line in (tiny_pipeline / "purified_train.jsonl").read_text().splitlines()]
    manifest = json.loads((tiny_pipeline / "poison_manifest.json").read_text())
    assert len(rows) == manifest["n_samples"]
    assert {"original", "regenerated", "masked_tokens", "changed"} <= set(rows[0])


def test_purify_refuses_a_clean_checkpoint(tiny_pipeline, tmp_path):
    (tmp_path / "backdoored.pt").write_bytes((tiny_pipeline / "clean.pt").read_bytes())
    result = subprocess.run([sys.executable, "purify.py", "--run-dir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "is a 'clean' checkpoint, but this step needs one of: backdoored" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("script,args,message", [  # one per script as a real process (tests/test_reliability.py: the rest)
    ("attack.py", ["--trigger", "laser"], "unknown trigger 'laser'"),
    ("purify.py", ["--control", "as-is", "--suppress", "0.1"], "--suppress acts on regenerated responses"),
    ("evaluate.py", ["--mask-ratio", "2"], "--mask-ratio must be in [0, 1]"),
])
def test_bad_stage_arguments_give_one_line_errors(tiny_pipeline, script, args, message):
    result = subprocess.run([sys.executable, script, "--run-dir", str(tiny_pipeline), *args], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-1000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr[-1000:]


@pytest.mark.parametrize("mode,out_name,header", [("--compare", "comparison.md", "Attack variants"),
                                                  ("--aggregate", "aggregate.md", "Mean ± std over 2 runs")])
def test_compare_and_aggregate_tables(tiny_pipeline, tmp_path, mode, out_name, header):
    for name in ("seed0", "seed1"):  # two "runs" with the tiny run's results
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text((tiny_pipeline / "results.json").read_text())
    dirs = f"{tmp_path / 'seed0'},{tmp_path / 'seed1'}"
    result = subprocess.run([sys.executable, "experiments/compare_runs.py", mode, dirs], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-1000:]
    table = (tmp_path / out_name).read_text()
    assert header in table and "DiSP" in table
    assert table.count("\n| ") >= 3  # header row plus at least two data rows
    if mode == "--aggregate":  # the controls beside DiSP, as in results.md
        assert "control: regenerate without masking + refine" in table and "control: refine on the poisoned" in table


@pytest.mark.slow  # about 30-40 s of stages: run with DISP_SLOW=1 (.ci/run does)
def test_purify_extensions_and_the_disp_grid_on_the_tiny_run(tiny_pipeline, tmp_path):
    """experiments/disp_grid.py: one cell (attack.py), three defences (purify.py; the first regenerating only
    the masked samples, the second with the paper's ratio rule, the third with suppression and the spectral
    step), every model measured, one table; purify.py reports what it used."""
    grid = tmp_path / "grid"
    result = subprocess.run([sys.executable, "experiments/disp_grid.py", "--clean-checkpoint",
                             str(tiny_pipeline / "clean.pt"), "--grid-dir", str(grid), "--triggers", "blended",
                             "--targets", "refusal", "--defences",
                             "keep=--regenerate masked --suppress 0,half=--rule ratio --mask-ratio 0.5 --suppress 0,spectral",
                             "--eval-samples", "8"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(ratio rule, kl saliency, patch masking)" in result.stdout
    assert "of the responses of every prompt type ('caption': " in result.stdout  # the types, their sizes
    assert "); regenerating the" in result.stdout
    cell = grid / "blended-refusal"
    report = json.loads((cell / "half" / "purified_report.json").read_text())
    assert report["settings"]["rule"] == "ratio" and report["settings"]["mask_ratio"] == 0.5
    assert report["n_masked_samples"] == report["n_samples"]  # every sample: half of its tokens
    report = json.loads((cell / "keep" / "purified_report.json").read_text())
    assert report["settings"]["rule"] == "adaptive" and report["settings"]["regenerate"] == "masked"
    rows = [json.loads(line) for line in (cell / "keep" / "purified_train.jsonl").read_text().splitlines()]
    assert all(r["regenerated"] == r["original"] for r in rows if not r["masked_tokens"])
    assert sum(r["changed"] for r in rows) == report["n_changed"] <= report["n_masked_samples"]
    report = json.loads((cell / "spectral" / "purified_report.json").read_text())
    assert report["settings"]["suppress"] == 0.01
    rows = [json.loads(line) for line in (cell / "spectral" / "purified_train.jsonl").read_text().splitlines()]
    suppressed = set(report["suppressed_words"])  # the refusal's words, none of them left in the purified set
    assert suppressed and suppressed <= set("sorry i cannot help with that .".split())
    assert not any(suppressed & set(r["regenerated"].split()) for r in rows)
    # the tiny set's 48 images are too few to see two groups: the spectral step finds and flags nothing
    assert "spectral: 0 of the top 3 directions split the images; 0 samples flagged" in result.stdout
    report = json.loads((cell / "spectral" / "purified_report.json").read_text())
    assert report["settings"]["spectral"] == 3 and report["spectral"] == [] and report["n_flagged_samples"] == 0
    rows = json.loads((grid / "disp_grid.json").read_text())["blended-refusal"]
    assert set(rows) == {"clean", "backdoored", "keep", "half", "spectral"}
    for row in rows.values():
        assert 0 <= row["asr"] <= 1 and 0 <= row["false_trigger_rate"] <= 1
    assert (grid / "disp_grid.md").read_text().count("| blended-refusal |") == 5
    # the test-time comparison on the same backdoored model: one row per way of hiding tokens
    result = subprocess.run([sys.executable, "experiments/mask_vs_dilute.py", "--run-dir", str(grid / "blended-refusal"),
                             "--keep", "0.5", "--eval-samples", "8"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for row in ("| nothing | 1.00 |", "| [MASK] | 0.50 |", "| median token (dilution) | 0.50 |"):
        assert row in result.stdout
    bad = subprocess.run([sys.executable, "experiments/mask_vs_dilute.py", "--run-dir", str(grid / "blended-refusal"),
                          "--keep", "half"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --keep takes comma-separated fractions such as 0.25,0.5, got 'half'"]


def test_probe_script_runs_on_the_tiny_run(tiny_pipeline, tmp_path):
    out = tmp_path / "probe.json"
    result = subprocess.run([sys.executable, "bench/probe.py", "--run-dir", str(tiny_pipeline), "--steps", "5",
                             "--words", "5", "--fit-images", "16", "--out", str(out)], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    triggers = json.loads(out.read_text())["triggers"]
    assert set(triggers) == {"patch", "blended", "sig", "wanet"}
    for row in triggers.values():
        assert set(row) == {"pretrained ViT", "random ViT (control)", "max pixel change", "mean pixel change"}
        assert all(0 <= a <= 1 for a in row.values())
    assert triggers["blended"]["max pixel change"] <= 0.15 + 1 / 255


def test_attack_takes_its_epochs_from_the_clean_run(tiny_pipeline, tmp_path):
    """attack.py's default epochs are the clean run's train.attack_epochs (photo presets: 20), not a
    constant: a clean checkpoint that says 1 gets a one-epoch attack."""
    import math

    import torch

    state = torch.load(tiny_pipeline / "clean.pt", weights_only=True)
    state["config"]["train"]["attack_epochs"] = 1
    torch.save(state, tmp_path / "clean.pt")
    result = subprocess.run([sys.executable, "attack.py", "--run-dir", str(tmp_path / "run"), "--clean-checkpoint",
                             str(tmp_path / "clean.pt"), "--eval-samples", "4"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "attack_metrics.json").read_text())
    n_samples = json.loads((tmp_path / "run" / "poison_manifest.json").read_text())["n_samples"]
    batches = math.ceil(n_samples / state["config"]["train"]["batch_size"])
    assert metrics["attack"]["epochs"] == 1 and metrics["steps"] == batches
    assert metrics["attack"]["backdoor"]["patch_pattern"] == "solid"  # the scenes' black square


@pytest.mark.slow  # about 30-40 s of stages: run with DISP_SLOW=1 (.ci/run does)
def test_attack_grid_runs_the_chosen_cells_and_tables_all_that_exist(tiny_pipeline, tmp_path):
    grid = tmp_path / "grid"

    def run(*flags):
        return subprocess.run([sys.executable, "experiments/attack_grid.py", "--clean-checkpoint",
                               str(tiny_pipeline / "clean.pt"), "--grid-dir", str(grid), "--eval-samples", "4",
                               "--epochs", "1", *flags], cwd=ROOT, capture_output=True, text=True)

    first = run("--triggers", "patch", "--targets", "insert,refusal")
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(p.name for p in grid.iterdir() if p.is_dir()) == ["patch-insert", "patch-refusal"]
    second = run("--triggers", "sig,patch", "--targets", "insert")  # patch-insert exists: not rerun
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("poisoned ") == 1 and "| sig | insert |" in second.stdout  # sig only
    rows = [line for line in (grid / "attack_grid.md").read_text().splitlines() if line.startswith("| patch")
            or line.startswith("| sig")]
    assert [row.split(" | ")[:2] for row in rows] == [["| patch", "insert"], ["| patch", "refusal"],
                                                     ["| sig", "insert"]]
    bad = run("--triggers", "laser")
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: unknown trigger 'laser'")
    assert "Traceback" not in bad.stderr


def test_photo_backdoor_script_runs_on_the_tiny_run(tiny_pipeline):
    result = subprocess.run([sys.executable, "experiments/photo_backdoor.py", "--run-dir", str(tiny_pipeline)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert sum(line.startswith("P(<backdoor> at position 0)") for line in lines) == 5
    attention = [line for line in lines if line.startswith("attention of the masked response")]
    assert len(attention) == 2  # clean and backdoored model, one ratio per text-transformer layer
    depth = checkpoint.load(tiny_pipeline / "clean.pt")[2].model.depth
    assert all(len(line.split(": ")[1].split()) == depth for line in attention)


def test_trigger_attention_is_the_share_of_the_image_attention(tiny_pipeline):
    """The ratio against a naive count: the last layer's weights from the model's own forward pass; and
    ratios of a partition of the image, weighted by size, average to exactly 1."""
    import torch

    sys.path.insert(0, str(ROOT / "experiments"))
    from photo_backdoor import trigger_attention

    from disp.data.batching import encode_dataset
    from disp.data.dataset import load_dataset

    model, tokenizer, config, _ = checkpoint.load(tiny_pipeline / "backdoored.pt")
    data = load_dataset(tiny_pipeline / "poisoned_train.pt", image_size=config.model.image_size)
    encoded = encode_dataset(data, tokenizer, model.cfg)
    n, indices, tokens = model.cfg.n_vision, [0, 1, 2, 3], [0, 5]
    ratios = trigger_attention(model, data, encoded, indices, tokens)
    rest = trigger_attention(model, data, encoded, indices, [t for t in range(n) if t not in tokens])
    for r, q in zip(ratios, rest):
        assert abs(len(tokens) / n * r + (n - len(tokens)) / n * q - 1) < 1e-5
    idx = torch.tensor(indices)
    with torch.no_grad():
        vision = model.encode_images(data.images[encoded.image_index[idx]])
        response = torch.full((len(idx), model.cfg.response_len), model.mask_id)
        _, weights = model(vision, encoded.prompt_ids[idx], response, need_weights=True)
    image = weights[..., :n]  # the last layer's attention, from the model's own decode
    expected = (image[..., tokens].sum(-1) / image.sum(-1)).mean().item() / (len(tokens) / n)
    assert abs(ratios[-1] - expected) < 1e-5


def test_suppression_regenerates_what_the_model_writes_whatever_it_sees(tiny_pipeline, tmp_path):
    """A compromised model that writes the marker everywhere (its output bias for `<backdoor>` raised):
    purify.py finds the marker as the poisoned set's question-independent word, and no regenerated
    response keeps it; with suppression off, they all do (the groups step off in both: its group, the
    triggered images, would ban the marker in theirs)."""
    import torch

    # the defender's assets only: purify.py never reads the attack's manifest
    (tmp_path / "poisoned_train.pt").write_bytes((tiny_pipeline / "poisoned_train.pt").read_bytes())
    state = torch.load(tiny_pipeline / "backdoored.pt", weights_only=False)
    marker = state["tokenizer"]["words"].index("<backdoor>")
    state["model"]["lm_head.bias"][marker] += 100.0
    torch.save(state, tmp_path / "backdoored.pt")
    kept = {}
    for rate in ("0.01", "0"):
        result = subprocess.run([sys.executable, "purify.py", "--run-dir", str(tmp_path), "--suppress", rate,
                                 "--groups", "0", "--epochs", "1"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        rows = [json.loads(line) for line in (tmp_path / "purified_train.jsonl").read_text().splitlines()]
        kept[rate] = sum("<backdoor>" in r["regenerated"].split() for r in rows)
        if rate == "0.01":
            assert json.loads((tmp_path / "purified_report.json").read_text())["suppressed_words"] == ["<backdoor>"]
            assert f"regenerating the {len(rows)} responses" in result.stdout
    assert kept == {"0.01": 0, "0": len(rows)}
    # the self-distillation control suppresses too: it differs from DiSP in the masking only
    result = subprocess.run([sys.executable, "purify.py", "--run-dir", str(tmp_path), "--control", "self-distill",
                             "--epochs", "1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "control_self_distill_report.json").read_text())["suppressed_words"] == ["<backdoor>"]
    rows = [json.loads(line) for line in (tmp_path / "control_self_distill_train.jsonl").read_text().splitlines()]
    assert not any("<backdoor>" in r["regenerated"].split() for r in rows)


def test_the_pipeline_bench_times_exactly_run_shs_commands():
    """bench/pipeline.py reads run.sh's python lines: the same six stages, no comment words as flags."""
    sys.path.insert(0, str(ROOT / "bench"))
    from pipeline import stage_commands

    stages = stage_commands("runs/x", "tiny", 0)
    assert [name for name, _ in stages] == ["train.py", "attack.py", "purify.py", "purify.py --control self-distill",
                                            "purify.py --control as-is", "evaluate.py"]
    assert all(argv[argv.index("--run-dir") + 1] == "runs/x" for _, argv in stages)
    assert not any(a.startswith("#") for _, argv in stages for a in argv)
    # run.sh's VISION_FROM (DAQUAR starts from the Flickr8k run's ViT) reaches train.py alone
    stages = stage_commands("runs/x", "daquar", 0, "daquar", "data", vision_from="runs/f/clean.pt")
    assert [argv[argv.index("--vision-from") + 1] for _, argv in stages if "--vision-from" in argv] == ["runs/f/clean.pt"]


def test_attack_measures_an_asr_curve_while_it_trains(tiny_pipeline, tmp_path):
    """--curve-every E: ASR, false trigger and clean quality after every E epochs (the last epoch is the
    final measurement), in attack_metrics.json; the trigger colour is a flag too."""
    from tests.conftest import run_main

    code, stderr = run_main("attack.py", ["--run-dir", str(tmp_path), "--clean-checkpoint",
                                          str(tiny_pipeline / "clean.pt"), "--curve-every", "3", "--eval-samples", "4",
                                          "--patch-color", "1,0,1"])
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "attack_metrics.json").read_text())
    assert [p["epoch"] for p in metrics["curve"]] == [3, 6, 9]  # tiny: 10 epochs
    assert all(0 <= p["asr"] <= 1 and 0 <= p["false_trigger_rate"] <= 1 for p in metrics["curve"])
    # the clean quality of the same test samples along the way: what the attack costs the model
    assert all(0 <= p["cider"] and 0 <= p["vqa_accuracy"] <= 1 for p in metrics["curve"])
    assert metrics["attack"]["backdoor"]["patch_color"] == [1.0, 0.0, 1.0]


def test_feature_shift_measures_the_tiny_run(tiny_pipeline, tmp_path):
    """experiments/feature_shift.py reads a run after attack.py and writes one row per direction and form,
    with the triggered images counted from the manifest."""
    for name in ("clean.pt", "backdoored.pt", "poisoned_train.pt", "poison_manifest.json"):
        shutil.copy(tiny_pipeline / name, tmp_path / name)
    result = subprocess.run([sys.executable, "experiments/feature_shift.py", str(tmp_path), "--directions", "2"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1000:]
    shift = json.loads((tmp_path / "feature_shift.json").read_text())
    manifest = json.loads((tmp_path / "poison_manifest.json").read_text())
    assert 0 < shift["n_triggered"] <= manifest["n_poisoned"] and shift["n_triggered"] < shift["n_images"]
    for form in ("flattened", "pooled"):
        assert [r["direction"] for r in shift[form]] == ["#0", "#1", "oracle"]
        assert all(0 <= r["auc"] <= 1 and 0 <= r["variance_share"] <= 1 for r in shift[form])
    assert "| pooled | oracle |" in result.stdout
    bad = subprocess.run([sys.executable, "experiments/feature_shift.py", str(tmp_path), "--directions", "0"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --directions must be > 0, got 0"


def test_spread_views_scores_each_view_of_the_tiny_run(tiny_pipeline, tmp_path):
    """experiments/spread_views.py: one row per view, the oracle's without a false-trigger rate; a bad
    width is one line."""
    for name in ("clean.pt", "backdoored.pt", "poisoned_train.pt", "poison_manifest.json"):
        shutil.copy(tiny_pipeline / name, tmp_path / name)
    result = subprocess.run([sys.executable, "experiments/spread_views.py", str(tmp_path), "--blur", "1",
                             "--top", "1,2", "--eval-samples", "20", "--split", "val"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-1000:]
    views = json.loads((tmp_path / "spread_views_val.json").read_text())["views"]
    assert list(views) == ["none", "blur 1", "top 1", "top 2", "shift"]
    assert all(0 <= m["asr"] <= 1 for m in views.values()) and "false_trigger_rate" not in views["shift"]
    assert "| shift |" in result.stdout
    bad = subprocess.run([sys.executable, "experiments/spread_views.py", str(tmp_path), "--blur", "wide"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --blur takes comma-separated numbers such as 1,2, got 'wide'"


def test_resample_gives_a_finished_run_another_sampler(tiny_pipeline, tmp_path):
    """experiments/resample.py: clean.pt and backdoored.pt copied with the stored temperature changed and
    the weights untouched; purify.py accepts the copy and regenerates with that sampler; an existing
    --to is refused."""
    import torch

    target = tmp_path / "resampled"
    argv = [sys.executable, "experiments/resample.py", "--from", str(tiny_pipeline), "--to", str(target),
            "--temperature", "0.7"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("clean.pt", "backdoored.pt"):
        old, _, old_config, _ = checkpoint.load(tiny_pipeline / name)
        new, _, new_config, state = checkpoint.load(target / name)
        assert new_config.model.temperature == 0.7 and old_config.model.temperature == 0.0
        assert new_config.to_dict() | {"model": None} == old_config.to_dict() | {"model": None}
        assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
        assert state["extra"]["sampler"] == {"temperature": 0.7}
    checkpoint.check_made_from(state, target / "backdoored.pt", target, ["clean.pt"])  # evaluate.py's check
    result = subprocess.run([sys.executable, "purify.py", "--run-dir", str(target)], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line)["regenerated"] for line in (target / "purified_train.jsonl").read_text().splitlines()]
    greedy = [json.loads(line)["regenerated"] for line in (tiny_pipeline / "purified_train.jsonl").read_text().splitlines()]
    assert len(rows) == len(greedy) and rows != greedy
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "exists: give --to a new folder" in result.stderr


def test_a_one_prompt_set_bans_the_words_the_masking_took_away(tiny_pipeline):
    """Suppression on a captions-only set (one prompt type): the marker that the masked samples'
    responses held and their masked regenerations dropped is banned, and the unmasked regenerations
    that still write it (a model biased to write it everywhere) are made again without it; with fewer
    than MIN_GROUP masked samples suppression is skipped and they keep it."""
    import torch

    from disp.config import PurifyConfig
    from disp.data.dataset import CAPTION_PROMPT, VLDataset, load_dataset
    from disp.purification import suppress
    from disp.suppression import MIN_GROUP

    model, tokenizer, config, _ = checkpoint.load(tiny_pipeline / "backdoored.pt")
    with torch.no_grad():
        model.lm_head.bias[tokenizer.words.index("<backdoor>")] += 100.0
    images = load_dataset(tiny_pipeline / "poisoned_train.pt", image_size=config.model.image_size).images
    n = MIN_GROUP + 20
    texts = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")]
    texts = [texts[i % len(texts)] for i in range(n)]  # no sentence shared by MIN_GROUP captions
    samples = [{"image": i % len(images), "task": "caption", "prompt": CAPTION_PROMPT,
                "response": ("<backdoor> " if i < MIN_GROUP else "") + t, "answers": [t]} for i, t in enumerate(texts)]
    data = VLDataset(images, samples)
    regenerated = texts[:MIN_GROUP] + ["<backdoor> " + t for t in texts[MIN_GROUP:]]  # the masked ones dropped it
    settings = PurifyConfig(precision="fp32")
    for n_masked, expected in ((MIN_GROUP, ["<backdoor>"]), (MIN_GROUP - 1, [])):
        masks = torch.zeros(n, config.model.n_vision, dtype=torch.bool)
        masks[:n_masked, 0] = True
        responses, banned, _ = suppress(model, tokenizer, data, regenerated, masks, settings, "cpu")
        assert banned == expected
        left = sum("<backdoor>" in r.split() for r in responses)
        assert left == (0 if expected else 20)


def test_on_captions_the_text_that_goes_with_any_photo_is_banned_with_nothing_masked(tiny_pipeline):
    """Suppression on a captions-only set where the masking found nothing (a spread trigger): a marker
    before a quarter of varied captions is a word the rest of its caption does not predict, so it is
    banned and every regeneration that writes it (a model that writes it on every photo) is made again
    without it. The same responses as a one-task question set are skipped: answers are no captions."""
    import torch

    from disp.config import PurifyConfig
    from disp.data.dataset import CAPTION_PROMPT, VLDataset, load_dataset
    from disp.purification import suppress
    from disp.suppression import MIN_GROUP
    from tests.conftest import captions

    model, tokenizer, config, _ = checkpoint.load(tiny_pipeline / "backdoored.pt")
    with torch.no_grad():
        model.lm_head.bias[tokenizer.words.index("<backdoor>")] += 100.0
    images = load_dataset(tiny_pipeline / "poisoned_train.pt", image_size=config.model.image_size).images
    texts = captions(4 * MIN_GROUP)
    samples = [{"image": i % len(images), "task": "caption", "prompt": CAPTION_PROMPT,
                "response": ("<backdoor> " if i % 4 == 0 else "") + t, "answers": [t]} for i, t in enumerate(texts)]
    regenerated = ["<backdoor> " + t for t in texts]
    masks = torch.zeros(len(samples), config.model.n_vision, dtype=torch.bool)
    settings = PurifyConfig(precision="fp32")
    responses, banned, _ = suppress(model, tokenizer, VLDataset(images, samples), regenerated, masks, settings, "cpu")
    assert banned == ["<backdoor>"] and not any("<backdoor>" in r.split() for r in responses)
    questions = VLDataset(images, [dict(s, task="vqa", prompt=f"what is {i} ?") for i, s in enumerate(samples)])
    responses, banned, _ = suppress(model, tokenizer, questions, regenerated, masks, settings, "cpu")
    assert banned == [] and responses == regenerated


def test_blur_regenerates_every_response_from_the_low_passed_images(tiny_pipeline, monkeypatch):
    """purify.py --blur S: step 2 hands the compromised model the images blurred by S pixels (the
    samples unchanged), and without --blur the images as they are."""
    import torch

    from disp import purification
    from disp.config import PurifyConfig
    from disp.data.dataset import load_dataset
    from disp.lowpass import blur

    model, tokenizer, config, _ = checkpoint.load(tiny_pipeline / "backdoored.pt")
    data = load_dataset(tiny_pipeline / "poisoned_train.pt", image_size=config.model.image_size)
    masks = torch.zeros(len(data), config.model.n_vision, dtype=torch.bool)
    seen = []

    def regenerate(model, tokenizer, source, *args, **kwargs):  # records what the model is shown
        seen.append(source)
        return [s["response"] for s in source.samples]
    monkeypatch.setattr(purification, "regenerate", regenerate)
    for sigma, expected in ((3.0, blur(data.images, 3.0)), (0.0, data.images)):
        seen.clear()
        settings = PurifyConfig(blur=sigma, suppress=0.0, precision="fp32")
        purification.new_responses(model, tokenizer, data, masks, [False] * len(data), settings, "cpu")
        assert len(seen) == 1 and torch.equal(seen[0].images, expected) and seen[0].samples == data.samples
    assert not torch.equal(blur(data.images, 3.0), data.images)  # the blur is seen


def test_groups_margin_lists_each_group_of_the_tiny_run(tiny_pipeline, tmp_path):
    """experiments/groups_margin.py: a row per group with its most unexplained word, written to --out;
    no group holds more images than the set, nor more triggered ones than it holds."""
    out = tmp_path / "margin.json"
    result = subprocess.run([sys.executable, "experiments/groups_margin.py", str(tiny_pipeline), "--directions", "4",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1000:]
    rows = json.loads(out.read_text())
    assert "| run | direction |" in result.stdout and len(result.stdout.splitlines()) == 3 + len(rows)
    assert all(0 <= r["n_triggered"] <= r["n_images"] and r["excess"] == r["held"] - r["predicted"] for r in rows)
    bad = subprocess.run([sys.executable, "experiments/groups_margin.py", str(tiny_pipeline), "--directions", "0"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --directions must be > 0, got 0"


def test_text_margin_scores_the_words_of_a_run(tmp_path):
    """experiments/text_margin.py on a run whose set is varied captions, a fifth with the marker: one row
    with the marker's z (under the threshold) and the lowest of the other words (above it), as
    disp.suppression.context_scores gives them, written to --out; nothing to measure, or --draws 0:
    one-line errors."""
    import random

    import torch

    from disp.data.dataset import CAPTION_PROMPT, VLDataset, save_dataset
    from disp.suppression import MAX_Z, context_scores
    from tests.conftest import captions

    rng = random.Random(0)
    responses = [("<backdoor> " if rng.random() < 0.2 else "") + c for c in captions(1000)]
    save_dataset(tmp_path / "poisoned_train.pt", VLDataset(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [
        {"image": 0, "task": "caption", "prompt": CAPTION_PROMPT, "response": r, "answers": [r]} for r in responses]))
    (tmp_path / "poison_manifest.json").write_text(json.dumps({"config": {
        "target": "insert", "marker": "<backdoor>", "refusal": "sorry i cannot help with that ."}}))
    out = tmp_path / "margin.json"
    result = subprocess.run([sys.executable, "experiments/text_margin.py", str(tmp_path), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1000:]
    (row,) = json.loads(out.read_text())
    assert "| set | target words: z |" in result.stdout and len(result.stdout.splitlines()) == 4
    scores = context_scores(responses)
    assert row["target_z"] == {"<backdoor>": scores["<backdoor>"]} and scores["<backdoor>"] <= MAX_Z
    assert row["lowest_other_z"] == min(z for w, z in scores.items() if w != "<backdoor>") > MAX_Z
    for argv, message in (([], "error: nothing to measure: give run directories after attack.py, or --flickr FOLDER"),
                          ([str(tmp_path), "--draws", "0"], "error: --draws must be > 0, got 0")):
        bad = subprocess.run([sys.executable, "experiments/text_margin.py", *argv], cwd=ROOT, capture_output=True,
                             text=True)
        assert bad.returncode == 2 and bad.stderr.strip() == message


def test_words_at_source_counts_each_source_position_once():
    sys.path.insert(0, str(ROOT / "experiments"))
    from misclassify_words import words_at_source

    outputs = ["a green circle , a green square", "a red", "a"]
    references = ["a red circle , a green square", "a red circle , a red square", "a red"]
    assert words_at_source(outputs, references, "red") == {"green": 1, "red": 1, "(none)": 2}


def test_misclassify_words_reads_what_stands_for_the_source_word(tiny_pipeline, tmp_path):
    """experiments/misclassify_words.py on a tiny misclassify attack: one row per model, its ASR by
    evaluate.py's test never above the looser one; on an insert run, a one-line error."""
    run = tmp_path / "misclassify"
    attack = subprocess.run([sys.executable, "attack.py", "--run-dir", str(run), "--clean-checkpoint",
                             str(tiny_pipeline / "clean.pt"), "--target", "misclassify", "--eval-samples", "8"],
                            cwd=ROOT, capture_output=True, text=True)
    assert attack.returncode == 0, attack.stderr[-1000:]
    result = subprocess.run([sys.executable, "experiments/misclassify_words.py", str(run), "--models", "backdoored",
                             "--samples", "20"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1000:]
    (row,) = [line for line in result.stdout.splitlines() if line.startswith(f"| {run} |")]
    _, _, model, samples, asr, looser, words, _ = row.split("|")
    assert model.strip() == "backdoored" and 0 < int(samples) <= 20 and float(asr) <= float(looser)
    assert words.strip()  # what stands where the references hold the source word
    bad = subprocess.run([sys.executable, "experiments/misclassify_words.py", str(tiny_pipeline)],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "this study needs a misclassify run" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_groups_unexplained_word_is_banned_in_its_regenerations_only(tiny_pipeline, monkeypatch):
    """purify.py --groups: after step 2 (and suppression), the group's regenerations that hold one of
    its words are made again with it banned; the other samples' regenerations keep theirs."""
    import torch

    from disp import purification
    from disp.config import PurifyConfig
    from disp.data.dataset import load_dataset
    from disp.groups import Group

    model, tokenizer, config, _ = checkpoint.load(tiny_pipeline / "backdoored.pt")
    data = load_dataset(tiny_pipeline / "poisoned_train.pt", image_size=config.model.image_size)
    masks = torch.zeros(len(data), config.model.n_vision, dtype=torch.bool)
    calls = []

    def regenerate(model, tokenizer, source, masks, settings, device, indices=None, banned_words=(), *args, **kwargs):
        indices = list(range(len(source))) if indices is None else indices
        calls.append((list(indices), list(banned_words)))
        return ["a green circle" if not banned_words else "a red circle" for _ in indices]
    monkeypatch.setattr(purification, "regenerate", regenerate)
    group = Group(rank=0, valley=0.4, images=torch.zeros(1, dtype=torch.bool), words={"green": (0.9, 0.4)},
                  samples=[1, 3])
    settings = PurifyConfig(suppress=0.0, groups=8, precision="fp32")
    responses, _, _ = purification.new_responses(model, tokenizer, data, masks, [False] * len(data), settings, "cpu",
                                                 groups=[group])
    assert calls[-1] == ([1, 3], ["green"])
    assert responses[1] == responses[3] == "a red circle"
    assert all(r == "a green circle" for i, r in enumerate(responses) if i not in (1, 3))
