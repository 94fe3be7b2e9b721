"""The project's sampler (disp.diffusion.generate) against a naive LLaDA-style reference, and
Fast-dLLM threshold decoding, on the trained clean model and the held-out test set.

    flock /tmp/torch.lock python bench/sampler.py                       # runs/default, fp32 and bf16
    flock /tmp/torch.lock python bench/sampler.py --precision fp32 --samples 128

naive: LLaDA's reference `generate` (GSAI-ML/LLaDA, generate.py) transcribed for this model: every
denoising step recomputes everything, the ViT included (model.encode_images inside the loop), and
commits tokens with a per-sample Python top-k loop. Greedy (temperature 0), low-confidence
remasking, steps = gen_length = block_length = response_len, as disp.evaluation uses.
generate: disp.diffusion.generate with the same arguments (ViT and image+prompt prefix once, then
only the response rows per step); its outputs must be token-identical to naive's (asserted).
generate, ViT per image: the project's own generation path (evaluate.py, purify.py through
disp.evaluation.generate_responses): the ViT once per distinct image of the samples (an image's
caption and questions share it), then generate(vision_tokens=...); also asserted identical. threshold: generate(..., threshold=t), Fast-dLLM parallel decoding; speed on the
same samples and the clean metrics (caption CIDEr-D, VQA accuracy, via disp.evaluation's
generate_responses + score, as clean_metrics does) on the whole test set, greedy vs threshold.
"""

import argparse
from pathlib import Path

from _common import (DispError, add_common_options, autocast, best_time, command_line, machine, machine_line,
                     pick_device, precisions, require, save_results, table)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from disp.support import checkpoint  # noqa: E402
from disp.data.batching import encode_dataset  # noqa: E402
from disp.diffusion import generate  # noqa: E402
from disp.support.errors import friendly_errors  # noqa: E402
from disp.evaluation import encode_images_once, generate_responses, score, split_indices  # noqa: E402
from disp.data.splits import load_split  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="run directory holding clean.pt")
    p.add_argument("--samples", type=int, default=256, help="test samples for the speed comparison (first N)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per generate call (evaluation's default)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per sampler (best is reported)")
    p.add_argument("--thresholds", default="0.7,0.9,0.95", help="Fast-dLLM confidence thresholds")
    p.add_argument("--metric-samples", type=int, default=None,
                   help="test samples per task group for the clean metrics (default: the whole test set)")
    add_common_options(p, "sampler")
    return p.parse_args(argv)


# --- the naive reference ---------------------------------------------------------------------------

def llada_num_transfer_tokens(mask_index, steps):
    """LLaDA's get_num_transfer_tokens, loop and all."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, : remainder[i]] += 1
    return num_transfer_tokens


@torch.no_grad()
def naive_generate(model, images, prompt_ids, *, gen_length, steps, block_length):
    """Greedy low-confidence LLaDA sampling with full recompute (ViT included) at every step."""
    mask_id = model.mask_id
    B = prompt_ids.shape[0]
    x = torch.full((B, gen_length), mask_id, dtype=torch.long, device=prompt_ids.device)
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        block_mask_index = x[:, num_block * block_length:(num_block + 1) * block_length] == mask_id
        num_transfer_tokens = llada_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            vision_tokens = model.encode_images(images)  # the image never changes, but naive recomputes it
            logits = model(vision_tokens, prompt_ids, x)
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, (num_block + 1) * block_length:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


# --- measurement -----------------------------------------------------------------------------------

def run_batches(fn, images, prompts, batch_size):
    """fn(images, prompts) -> ids or (ids, calls), over batches; -> (ids, [calls per batch])."""
    outs, calls = [], []
    for s in range(0, len(prompts), batch_size):
        r = fn(images[s:s + batch_size], prompts[s:s + batch_size])
        if isinstance(r, tuple):
            r, c = r
            calls.append(c)
        outs.append(r)
    return torch.cat(outs), calls


def main(argv=None):
    args = parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    if args.samples < 1 or args.batch_size < 1 or args.repeats < 1:
        raise DispError("--samples, --batch-size and --repeats must be >= 1")
    if any(not 0.0 < t < 1.0 for t in thresholds):
        raise DispError(f"thresholds must lie in (0, 1), got {args.thresholds}")
    device = pick_device(args.device)
    which = precisions(args.precision)
    run_dir = Path(args.run_dir)
    require(run_dir / "clean.pt", "the clean model")
    info = machine()
    print(f"machine: {machine_line(info)}")

    model, tokenizer, config, _ = checkpoint.load(run_dir / "clean.pt", stages=["clean"], device=device)
    cfg = model.cfg
    test = load_split(config.data, cfg.image_size, "test")
    n = min(args.samples, len(test.samples))
    enc = encode_dataset(test, tokenizer, cfg)
    images = test.images[enc.image_index[:n]].to(device)
    prompts = enc.prompt_ids[:n].to(device)
    kw = dict(gen_length=cfg.response_len, steps=cfg.response_len, block_length=cfg.response_len)
    caption_idx, vqa_idx = split_indices(test, args.metric_samples)
    metric_idx = caption_idx + vqa_idx
    print(f"{run_dir / 'clean.pt'}: speed on the first {n} test samples (batch {args.batch_size}, best of "
          f"{args.repeats}); clean metrics on {len(caption_idx)} caption + {len(vqa_idx)} VQA test samples; "
          f"greedy, gen_length = steps = block_length = {cfg.response_len}")

    results = {"machine": info, "command": command_line(), "run_dir": str(run_dir), "samples": n,
               "batch_size": args.batch_size, "repeats": args.repeats, "metric_samples": len(metric_idx),
               "gen_length": cfg.response_len, "steps": cfg.response_len, "runs": {}}
    greedy_outputs = {}
    for precision in which:
        with autocast(device, precision):
            # warm-up (first-call allocations, oneDNN kernel selection) on a small batch
            generate(model, images[:8], prompts[:8], **kw)
            naive_generate(model, images[:8], prompts[:8], **kw)

            (naive_ids, _), t_naive = best_time(lambda: run_batches(
                lambda im, pr: naive_generate(model, im, pr, **kw), images, prompts, args.batch_size),
                args.repeats, device)
            (fast_ids, _), t_fast = best_time(lambda: run_batches(
                lambda im, pr: generate(model, im, pr, **kw), images, prompts, args.batch_size), args.repeats, device)

            def per_image():
                vision, row = encode_images_once(model, test, enc.image_index[:n], device)
                return torch.cat([generate(model, None, prompts[s:s + args.batch_size],
                                           vision_tokens=vision[row[s:s + args.batch_size]], **kw)
                                  for s in range(0, n, args.batch_size)])
            per_image_ids, t_per_image = best_time(per_image, args.repeats, device)
            # where the time goes, per batch of the first batch's size
            b = min(args.batch_size, n)
            vt, t_vit = best_time(lambda: model.encode_images(images[:b]), 3, device)
            full = torch.full((b, cfg.response_len), model.mask_id, dtype=torch.long, device=device)
            _, t_call = best_time(lambda: model(vt, prompts[:b], full), 3, device)
            cache, t_prefix = best_time(lambda: model.prefix(vt, prompts[:b]), 3, device)
            _, t_decode = best_time(lambda: model.decode(cache, full), 3, device)
            batches = -(-n // args.batch_size)
            steps = cfg.response_len
            t_model_fast = t_vit + t_prefix + steps * t_decode  # generate's model work per batch
            breakdown = {"batch": b, "vit_ms": 1e3 * t_vit, "full_model_call_ms": 1e3 * t_call,
                         "prefix_ms": 1e3 * t_prefix, "decode_step_ms": 1e3 * t_decode,
                         "generate_overhead_ms_per_batch": 1e3 * (t_fast / batches - t_model_fast),
                         "naive_overhead_ms_per_batch": 1e3 * (t_naive / batches - steps * (t_call + t_vit)),
                         "ceiling_speedup_if_overheads_were_zero": steps * (t_vit + t_call) / t_model_fast}
            identical = bool(torch.equal(naive_ids, fast_ids)) and bool(torch.equal(naive_ids, per_image_ids))
            same_rows = int(((naive_ids == fast_ids) & (naive_ids == per_image_ids)).all(dim=1).sum())
            greedy_outputs[precision] = fast_ids
            run = {"naive": {"seconds": t_naive, "samples_per_s": n / t_naive,
                             "model_calls_per_batch": cfg.response_len, "vit_calls_per_batch": cfg.response_len},
                   "generate": {"seconds": t_fast, "samples_per_s": n / t_fast,
                                "model_calls_per_batch": cfg.response_len, "vit_calls_per_batch": 1},
                   "generate_vit_per_image": {"seconds": t_per_image, "samples_per_s": n / t_per_image,
                                              "images": int(enc.image_index[:n].unique().numel())},
                   "speedup_generate_vs_naive": t_naive / t_fast,
                   "speedup_generate_vit_per_image_vs_naive": t_naive / t_per_image, "identical_greedy_outputs": identical,
                   "identical_rows": same_rows, "time_breakdown": breakdown, "threshold": {}}
            print(f"  {precision}: naive {n / t_naive:.1f} samples/s, generate {n / t_fast:.1f} samples/s "
                  f"({t_naive / t_fast:.2f}x), generate with the ViT per image {n / t_per_image:.1f} samples/s "
                  f"({t_naive / t_per_image:.2f}x), identical outputs: {same_rows}/{n} rows")
            print(f"    per batch of {b}: ViT {1e3 * t_vit:.1f} ms, whole text model {1e3 * t_call:.1f} ms, prefix "
                  f"{1e3 * t_prefix:.1f} ms, one decode step {1e3 * t_decode:.1f} ms; "
                  f"sampling overhead beyond the model calls: generate {breakdown['generate_overhead_ms_per_batch']:.1f}"
                  f" ms, naive {breakdown['naive_overhead_ms_per_batch']:.1f} ms; ceiling of generate/naive with "
                  f"zero overheads: {breakdown['ceiling_speedup_if_overheads_were_zero']:.2f}x")

            for t in thresholds:
                (ids, calls), secs = best_time(lambda: run_batches(
                    lambda im, pr: generate(model, im, pr, threshold=t, return_steps=True, **kw),
                    images, prompts, args.batch_size), args.repeats, device)
                run["threshold"][str(t)] = {
                    "seconds": secs, "samples_per_s": n / secs, "speedup_vs_generate": t_fast / secs,
                    "model_calls_per_batch": sum(calls) / len(calls), "calls_each_batch": calls,
                    "rows_same_as_greedy": int((ids == fast_ids).all(dim=1).sum())}

            # clean metrics on the test set: greedy vs each threshold (the evaluation code path)
            run["metrics"] = {}
            for t in [None] + thresholds:
                preds, secs = best_time(lambda: generate_responses(model, tokenizer, test, metric_idx, device=device,
                                                                   batch_size=args.batch_size, threshold=t), 1, device)
                m = score(test, metric_idx, preds)
                run["metrics"]["greedy" if t is None else str(t)] = {
                    "cider": m.get("cider"), "vqa_accuracy": m.get("vqa_accuracy"), "bleu4": m.get("bleu4"),
                    "caption_exact_match": m.get("caption_exact_match"), "seconds": secs,
                    "samples_per_s": len(metric_idx) / secs}
        results["runs"][precision] = run

    # --- report -------------------------------------------------------------------------------------
    print()
    rows = []
    for precision, run in results["runs"].items():
        g = run["metrics"]["greedy"]
        rows.append([precision, "naive (ViT every step, per-sample top-k)", f"{run['naive']['samples_per_s']:.1f}", "1.00x",
                     "", cfg.response_len, "", "", ""])
        rows.append([precision, "generate (greedy)", f"{run['generate']['samples_per_s']:.1f}",
                     f"{run['speedup_generate_vs_naive']:.2f}x", "1.00x", cfg.response_len,
                     "", "", ""])
        rows.append([precision, "generate, ViT per image (evaluate/purify path)",
                     f"{run['generate_vit_per_image']['samples_per_s']:.1f}",
                     f"{run['speedup_generate_vit_per_image_vs_naive']:.2f}x",
                     f"{run['generate']['seconds'] / run['generate_vit_per_image']['seconds']:.2f}x", cfg.response_len,
                     f"{g['vqa_accuracy']:.3f}", f"{g['cider']:.3f}", f"{g['samples_per_s']:.0f}"])
        for t, r in run["threshold"].items():
            m = run["metrics"][t]
            rows.append([precision, f"generate threshold={t}", f"{r['samples_per_s']:.1f}",
                         f"{run['naive']['seconds'] / r['seconds']:.2f}x", f"{r['speedup_vs_generate']:.2f}x",
                         f"{r['model_calls_per_batch']:.1f}", f"{m['vqa_accuracy']:.3f}", f"{m['cider']:.3f}",
                         f"{m['samples_per_s']:.0f}"])
    print(table(["precision", "sampler", f"samples/s ({n})", "vs naive", "vs generate", "model calls/batch",
                 f"VQA acc ({len(vqa_idx)})", f"CIDEr-D ({len(caption_idx)})", "samples/s (metric set)"], rows))

    if len(which) == 2:
        same = int((greedy_outputs["fp32"] == greedy_outputs["bf16"]).all(dim=1).sum())
        gf, gb = results["runs"]["fp32"]["metrics"]["greedy"], results["runs"]["bf16"]["metrics"]["greedy"]
        results["bf16_vs_fp32"] = {"identical_rows": same, "vqa_delta": gb["vqa_accuracy"] - gf["vqa_accuracy"],
                                   "cider_delta": gb["cider"] - gf["cider"],
                                   "generate_speedup": (results["runs"]["fp32"]["generate"]["seconds"]
                                                        / results["runs"]["bf16"]["generate"]["seconds"])}
        b = results["bf16_vs_fp32"]
        print(f"\nbf16 vs fp32 greedy: {same}/{n} identical rows, VQA {b['vqa_delta']:+.3f}, CIDEr-D "
              f"{b['cider_delta']:+.3f}, generate {b['generate_speedup']:.2f}x faster")

    # --- bars ----------------------------------------------------------------------------------------
    print("\nbars:")
    bars = {}
    for precision, run in results["runs"].items():
        for key, name in [("speedup_generate_vs_naive", "generate"),
                          ("speedup_generate_vit_per_image_vs_naive", "generate, ViT per image")]:
            s = run[key]
            ok = s >= 5 and run["identical_greedy_outputs"]
            bars[f"{precision}: {name} >= 5x naive, identical outputs"] = ok
            print(f"  {precision}: {name} {s:.2f}x naive, identical: {run['identical_greedy_outputs']} -> "
                  f"{'MET' if ok else 'NOT MET'}")
        g = run["metrics"]["greedy"]
        for t, r in run["threshold"].items():
            m = run["metrics"][t]
            vqa_loss = 100 * (g["vqa_accuracy"] - m["vqa_accuracy"])
            cider_rel = 100 * (g["cider"] - m["cider"]) / g["cider"] if g["cider"] else 0.0
            ok = r["speedup_vs_generate"] >= 2 and vqa_loss <= 1 and cider_rel <= 3
            bars[f"{precision}: threshold {t} >= 2x generate, <= 1 pt VQA, <= 3% CIDEr-D"] = ok
            print(f"  {precision}: threshold {t}: {r['speedup_vs_generate']:.2f}x generate, VQA loss {vqa_loss:.2f} pt, "
                  f"CIDEr-D loss {cider_rel:.2f}% -> {'MET' if ok else 'NOT MET'}")
    results["bars"] = bars
    path = save_results("sampler", results, args.out)
    print(f"wrote {path}")
    bad = [p for p, run in results["runs"].items() if not run["identical_greedy_outputs"]]
    assert not bad, f"generate and the naive reference disagree at {bad} (see {path})"


if __name__ == "__main__":
    with friendly_errors():
        main()
