"""Markdown tables: evaluate.py's results.md (the results table, the sweep, examples), and the table
format that experiments/compare_runs.py shares."""

COLUMNS = [("asr", "ASR"), ("false_trigger_rate", "false trigger"), ("cider", "CIDEr-D"), ("bleu4", "BLEU-4"),
           ("distinct_captions", "distinct captions"), ("vqa_accuracy", "VQA acc.")]


def table(rows: dict, fmt=lambda v: f"{v:.3f}") -> str:
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
    suppression += f", groups along {cfg['groups']} directions" if cfg.get("groups") else ""
    out = [f"# DiSP results: {run_dir}\n\n",
           f"Attack: {cfg['trigger']} trigger, {cfg['target']} target, poison rate {cfg['poison_rate']}, "
           f"attack trains {cfg['attack_trainable']}. DiSP: {cfg['saliency']} saliency, {cfg['rule']} rule{suppression}. "
           f"Test-time fixed mask ratio {cfg['mask_ratio']}. Preset {cfg['preset']}, seed {cfg['seed']}.\n\n",
           "Rates are fractions in [0, 1]. ASR: share of triggered test inputs whose output shows the target "
           "(misclassify: the source word gone and the destination word more often than in the reference); "
           "false trigger: the same test on the clean inputs; CIDEr-D / BLEU-4 / VQA accuracy on clean inputs.\n\n",
           table(ordered)]
    if "majority_answer" in results:
        m = results["majority_answer"]
        out.append(f"\nMajority answer (the most frequent training answer, {m['answer']!r}, given to every "
                   f"question): VQA accuracy {m['vqa_accuracy']:.3f}.\n")
    if cfg["preset"] == "tiny":
        out.insert(1, "**tiny preset: a smoke test of the code paths; its models learn nothing, so these numbers "
                      "say nothing about DiSP. Use the small or cpu preset for results.**\n\n")
    if results["sweep"]:
        # the quality columns the sweep measured: the tasks the data has (no CIDEr-D on questions only)
        quality = [(key, name) for key, name in (("vqa_accuracy", "clean VQA"), ("cider", "clean CIDEr-D"))
                   if key in next(iter(results["sweep"].values()))]
        out += ["\n## Mask-ratio sweep (backdoored model, masking at inference only)\n\n", "![sweep](sweep.png)\n\n",
                "| selection | ratio | ASR | " + " | ".join(name for _, name in quality) + " |\n"
                "|---|---:|---:|" + "---:|" * len(quality) + "\n"]
    for method, curve in results["sweep"].items():
        for k, r in enumerate(curve["ratio"]):
            cells = "".join(f" {curve[key][k]:.3f} |" for key, _ in quality)
            out.append(f"| {method} | {r:.2f} | {curve['asr'][k]:.3f} |{cells}\n")
    out.append("\n## Examples on triggered test images\n\n| prompt | reference | backdoored | DiSP |\n|---|---|---|---|\n")
    for e in results["examples"]:
        out.append(f"| {e['prompt']} | {e['reference']} | {e['backdoored']} | {e['purified']} |\n")
    if results["config"].get("saliency_figure"):
        out.append("\nSaliency heatmaps of training samples, with the tokens purify.py masked: ![saliency](purified_saliency.png)\n")
    return "".join(out)
