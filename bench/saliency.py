"""Saliency cost and agreement: exact occlusion KL vs the Fisher (Hutchinson) estimate, on the
backdoored model and the poisoned fine-tuning set (what purify.py scores).

    flock /tmp/torch.lock python bench/saliency.py                      # runs/default, fp32 and bf16
    flock /tmp/torch.lock python bench/saliency.py --precision fp32 --samples 128

Both methods run through disp.evaluation.token_scores (purify.py's code path, its default batch of
128, ViT encoding included) on the first --samples samples of poisoned_train.pt, masking the token
alone (`purify.py --masking token`, what the Fisher estimate approximates; purify.py's default also
paints each occluded patch and runs the ViT per copy: 1.3-1.4x the KL's time on Flickr8k). Cost: ms per
sample. Agreement per sample: Spearman rank correlation of the two score vectors (averaged over
samples), top-1 agreement (same most salient token). On the poisoned samples (poison_manifest.json,
which DiSP itself never reads) each method's share that ranks the trigger token first: the vision
token(s) covered by the patch trigger (top-left 8 px patch = token 0 at the default config).
"""

import argparse
import json
from pathlib import Path

from _common import (DispError, add_common_options, autocast, best_time, command_line, machine, machine_line,
                     pick_device, precisions, require, save_results, table)

import torch  # noqa: E402

from disp.support import checkpoint  # noqa: E402
from disp.backdoor import BackdoorConfig, trigger_tokens  # noqa: E402
from disp.data.dataset import load_dataset  # noqa: E402
from disp.support.errors import friendly_errors  # noqa: E402
from disp.evaluation import token_scores  # noqa: E402

METHODS = ("kl", "fisher")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="run directory with backdoored.pt, poisoned_train.pt")
    p.add_argument("--samples", type=int, default=512, help="first N samples of the poisoned set (~20%% poisoned)")
    p.add_argument("--batch-size", type=int, default=128, help="samples per scoring batch (purify.py's default)")
    add_common_options(p, "saliency")
    p.add_argument("--seed", type=int, default=0, help="Hutchinson probe seed (as purify.py's --seed)")
    return p.parse_args(argv)


def ranks(scores):
    """(B, N) -> (B, N) float ranks 0..N-1 per row (ordinal; the scores are continuous)."""
    return scores.argsort(dim=1).argsort(dim=1).double()


def spearman(a, b):
    """(B,) per-row Spearman rank correlation."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def agreement(a, b, rows) -> dict:
    if not rows:
        return {"n": 0}
    a, b = a[rows], b[rows]
    return {"n": len(rows), "spearman_mean": spearman(a, b).mean().item(),
            "top1_agreement": (a.argmax(1) == b.argmax(1)).double().mean().item()}


def trigger_stats(scores, rows, trig) -> dict:
    if not rows or trig is None:
        return {}
    s = scores[rows]
    first = torch.tensor([int(i) in trig for i in s.argmax(1)])
    best_rank = ranks(-s)[:, trig].min(dim=1).values  # 0 = the trigger token is the most salient
    top2 = s.topk(2, dim=1).values
    return {"trigger_first": first.double().mean().item(), "trigger_rank_mean": best_rank.mean().item(),
            "top1_over_top2_median": (top2[:, 0] / top2[:, 1].clamp_min(1e-30)).median().item()}


def main(argv=None):
    args = parse_args(argv)
    if args.samples < 1 or args.batch_size < 1:
        raise DispError("--samples and --batch-size must be >= 1")
    device = pick_device(args.device)
    which = precisions(args.precision)
    run_dir = Path(args.run_dir)
    require(run_dir / "backdoored.pt", "the backdoored model")
    require(run_dir / "poisoned_train.pt", "the poisoned fine-tuning set")
    require(run_dir / "poison_manifest.json", "which samples are poisoned")
    info = machine()
    print(f"machine: {machine_line(info)}")

    model, tokenizer, config, state = checkpoint.load(run_dir / "backdoored.pt", stages=["backdoored"], device=device)
    data = load_dataset(run_dir / "poisoned_train.pt")
    manifest = json.loads((run_dir / "poison_manifest.json").read_text())
    bcfg = BackdoorConfig.from_dict(state["extra"]["attack"]["backdoor"])
    trig = trigger_tokens(bcfg, model.cfg.image_size, model.cfg.patch_size) if bcfg.trigger == "patch" else None
    n = min(args.samples, len(data.samples))
    indices = list(range(n))
    poisoned_all = set(manifest["poisoned_indices"])
    poisoned = [i for i in indices if i in poisoned_all]
    clean = [i for i in indices if i not in poisoned_all]
    print(f"{run_dir}: first {n} of {len(data.samples)} poisoned-set samples ({len(poisoned)} poisoned, {len(clean)} clean), "
          f"batch {args.batch_size}; {bcfg.trigger} trigger {bcfg.patch_position if trig else ''}, trigger token(s) {trig}")

    results = {"machine": info, "command": command_line(), "run_dir": str(run_dir), "samples": n,
               "poisoned_samples": len(poisoned), "batch_size": args.batch_size, "trigger_tokens": trig, "runs": {}}
    all_scores = {}
    for precision in which:
        run = {}
        with autocast(device, precision):
            token_scores(model, tokenizer, data, indices[:8], "kl", batch_size=8, device=device)  # warm-up
            for method in METHODS:
                s, secs = best_time(lambda: token_scores(model, tokenizer, data, indices, method,
                                                         batch_size=args.batch_size, device=device, seed=args.seed),
                                    1, device)
                all_scores[(precision, method)] = s
                run[method] = {"seconds": secs, "ms_per_sample": 1e3 * secs / n,
                               "poisoned": trigger_stats(s, poisoned, trig), "clean": trigger_stats(s, clean, None)}
                print(f"  {precision} {method}: {1e3 * secs / n:.2f} ms/sample ({secs:.1f} s)")
        kl, fi = all_scores[(precision, "kl")], all_scores[(precision, "fisher")]
        run["agreement"] = {"all": agreement(kl, fi, indices), "poisoned": agreement(kl, fi, poisoned),
                            "clean": agreement(kl, fi, clean)}
        run["kl_cost_over_fisher"] = run["kl"]["seconds"] / run["fisher"]["seconds"]
        results["runs"][precision] = run

    # --- report -------------------------------------------------------------------------------------
    print()
    rows = []
    for precision, run in results["runs"].items():
        for method in METHODS:
            p = run[method]["poisoned"]
            rows.append([precision, method, f"{run[method]['ms_per_sample']:.2f}",
                         f"{100 * p['trigger_first']:.1f}%" if p else "n/a",
                         f"{p['trigger_rank_mean']:.2f}" if p else "n/a",
                         f"{p['top1_over_top2_median']:.3g}" if p else "n/a"])
    print(table(["precision", "method", "ms/sample", f"trigger ranked 1st ({len(poisoned)} poisoned)",
                 "mean trigger rank (0 = 1st)", "median top1/top2 score"], rows))
    print()
    rows = []
    for precision, run in results["runs"].items():
        for group in ("all", "poisoned", "clean"):
            a = run["agreement"][group]
            if a["n"]:
                rows.append([precision, group, a["n"], f"{a['spearman_mean']:.3f}", f"{100 * a['top1_agreement']:.1f}%"])
    print("kl vs fisher agreement, per sample:")
    print(table(["precision", "samples", "n", "Spearman (mean)", "top-1 agreement"], rows))
    if len(which) == 2:
        cross = {}
        for method in METHODS:
            a, b = all_scores[("fp32", method)], all_scores[("bf16", method)]
            cross[method] = agreement(a, b, indices)
            cross[method]["speedup_bf16"] = (results["runs"]["fp32"][method]["seconds"]
                                             / results["runs"]["bf16"][method]["seconds"])
        results["bf16_vs_fp32"] = cross
        print("\nbf16 vs fp32, same method: " + "; ".join(
            f"{m}: Spearman {c['spearman_mean']:.3f}, top-1 agreement {100 * c['top1_agreement']:.1f}%, "
            f"{c['speedup_bf16']:.2f}x faster" for m, c in cross.items()))
    path = save_results("saliency", results, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    with friendly_errors():
        main()
