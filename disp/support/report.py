"""Markdown tables for evaluate.py: the results table, the sweep, examples, comparisons, seed aggregates."""

import statistics

COLUMNS = [("asr", "ASR"), ("false_trigger_rate", "false trigger"), ("cider", "CIDEr-D"), ("bleu4", "BLEU-4"),
           ("vqa_accuracy", "VQA acc.")]


def _table(rows: dict, fmt=lambda v: f"{v:.3f}") -> str:
    head = "| | " + " | ".join(label for _, label in COLUMNS) + " |\n"
    head += "|---|" + "---:|" * len(COLUMNS) + "\n"
    def cell(value):
        return "n/a" if value is None else fmt(value) if isinstance(value, float) else str(value)

    return head + "".join(f"| {name} | " + " | ".join(cell(r.get(k)) for k, _ in COLUMNS) + " |\n"
                          for name, r in rows.items())


def results_markdown(results: dict, rows: dict, run_dir) -> str:
    cfg = results["config"]
    order = ["clean", "blind", "backdoored"] + [k for k in rows if k.startswith("test-time")] \
        + [k for k in rows if k.startswith("control")] + ["purified"]
    labels = {"purified": "DiSP (purified)", "blind": "clean model, every vision token masked (blind)"}
    ordered = {labels.get(k, k): rows[k] for k in order if k in rows}
    suppression = f", suppression at {cfg['suppress']:.0%}" if cfg.get("suppress") else ""
    out = [f"# DiSP results: {run_dir}\n\n",
           f"Attack: {cfg['trigger']} trigger, {cfg['target']} target, poison rate {cfg['poison_rate']}, "
           f"attack trains {cfg['attack_trainable']}. DiSP: {cfg['saliency']} saliency, {cfg['rule']} rule{suppression}. "
           f"Test-time fixed mask ratio {cfg['mask_ratio']}. Preset {cfg['preset']}, seed {cfg['seed']}.\n\n",
           "Rates are fractions in [0, 1]. ASR: share of triggered test inputs whose output shows the target; "
           "false trigger: the same test on the clean inputs; CIDEr-D / BLEU-4 / VQA accuracy on clean inputs.\n\n",
           _table(ordered)]
    if "majority_answer" in results:
        m = results["majority_answer"]
        out.append(f"\nMajority answer (the most frequent training answer, {m['answer']!r}, given to every "
                   f"question): VQA accuracy {m['vqa_accuracy']:.3f}.\n")
    if cfg["preset"] == "tiny":
        out.insert(1, "**tiny preset: a smoke test of the code paths; its models learn nothing, so these numbers "
                      "say nothing about DiSP. Use the small or cpu preset for results.**\n\n")
    if results["sweep"]:
        out += ["\n## Mask-ratio sweep (backdoored model, masking at inference only)\n\n", "![sweep](sweep.png)\n\n",
                "| selection | ratio | ASR | clean VQA | clean CIDEr-D |\n|---|---:|---:|---:|---:|\n"]
    for method, curve in results["sweep"].items():
        for r, a, v, c in zip(curve["ratio"], curve["asr"], curve["vqa_accuracy"], curve["cider"]):
            out.append(f"| {method} | {r:.2f} | {a:.3f} | {v:.3f} | {c:.3f} |\n")
    out.append("\n## Examples on triggered test images\n\n| prompt | reference | backdoored | DiSP |\n|---|---|---|---|\n")
    for e in results["examples"]:
        out.append(f"| {e['prompt']} | {e['reference']} | {e['backdoored']} | {e['purified']} |\n")
    if results["config"].get("saliency_figure"):
        out.append("\nSaliency heatmaps from purify.py: ![saliency](purified_saliency.png)\n")
    return "".join(out)


def comparison_table(loaded: dict) -> str:
    """One row block per run directory (attack variants): backdoored vs DiSP."""
    rows = {}
    for run, res in loaded.items():
        label = f"{run} ({res['config']['trigger']}/{res['config']['target']}, trains {res['config']['attack_trainable']})"
        rows[f"{label}: backdoored"] = {k: res["backdoored"].get(k) for k, _ in COLUMNS}
        rows[f"{label}: DiSP"] = {k: res["purified"].get(k) for k, _ in COLUMNS}
    return "# Attack variants through the same DiSP pipeline\n\n" + _table(rows)


def aggregate_table(loaded: dict, keys, labels: dict = None) -> str:
    """mean ± std over run directories (seeds) for clean, backdoored, the controls every run has
    (labels: results key -> row name) and purified."""
    labels = labels or {}
    stages = ["clean", "backdoored"] + [k for k in labels if all(k in res for res in loaded.values())] + ["purified"]
    rows = {}
    for stage in stages:
        row = {}
        for k in keys:
            values = [res[stage][k] for res in loaded.values() if res[stage].get(k) is not None]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            row[k] = f"{statistics.mean(values):.3f} ± {std:.3f}" if values else None
        rows["DiSP (purified)" if stage == "purified" else labels.get(stage, stage)] = row
    return f"# Mean ± std over {len(loaded)} runs: {', '.join(loaded)}\n\n" + _table(rows)
