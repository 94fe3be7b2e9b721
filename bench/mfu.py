"""Training MFU: model FLOP/s of the SFT training step divided by the machine's measured matmul peak.

    flock /tmp/torch.lock python bench/mfu.py                      # cpu preset, fp32 and bf16 side by side
    flock /tmp/torch.lock python bench/mfu.py --precision fp32 --steps 30

The step is `disp.training.Finetuner.step`, the very update train.py's clean SFT makes, at the
preset's batch size, on the real encoded training split: projector on the ViT features cached once
per stage (the ViT is frozen), a random vision mask, disp.diffusion.sft_loss, backward,
clip_grad_norm_(1.0), AdamW.step, on the text parameters. The data, tokenizer and model are built
as train.py builds them; only the weights are fresh (nothing here needs a trained model).

FLOPs: torch.utils.flop_counter.FlopCounterMode over one forward + backward (attention included:
the model writes it out as matmuls), next to an analytic count. The peak is the best of several
2048^3 GEMMs in fp32 and in bf16, measured in the same run. bf16 = torch.autocast(bfloat16) around
the forward (fp32 weights and optimizer), as train.py does under --precision bf16 (auto picks it on
hardware with fast bf16 units). The MFU bar is judged on the fp32 step.
"""

import argparse
import time
from dataclasses import replace

from _common import (DispError, add_common_options, command_line, gemm_peak, machine, machine_line,
                     pick_device, precisions, save_results, sync, table)

import torch  # noqa: E402  (after _common, which puts the repository on sys.path)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from disp.config import get_preset, with_vocabulary  # noqa: E402
from disp.data.batching import encode_dataset  # noqa: E402
from disp.data.splits import load_split  # noqa: E402
from disp.data.tokenizer import Tokenizer  # noqa: E402
from disp.support import checkpoint  # noqa: E402
from disp.support.errors import friendly_errors  # noqa: E402
from disp.training import Finetuner  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help="model/batch preset (default: cpu, the default pipeline's)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per precision")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    add_common_options(p, "mfu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def analytic_flops(cfg, batch: int) -> dict:
    """Matmul FLOPs of one forward + backward of projector + text model as the model computes them
    (backward = 2x forward, except the projector's first layer, whose input needs no gradient).

    The prefix (image + prompt, P rows) goes through every block but the last, of which it needs only
    keys and values; the response (L rows) through every block. Prefix rows attend to P keys,
    response rows to P + L. `full` is the same model run LLaDA-style, every row in every block
    attending to every row, for comparison.
    """
    B, N, L, depth = batch, cfg.n_vision, cfg.response_len, cfg.depth
    P, T = N + cfg.prompt_len, cfg.seq_len
    D, Dv, m, V = cfg.dim, cfg.vit_dim, cfg.mlp_ratio, cfg.vocab_size
    proj_first, proj_second = 2 * B * N * Dv * D, 2 * B * N * D * D
    row = 2 * D * D * (3 + 1 + 2 * m)  # one row through one block: qkv, out-projection, MLP
    linear = B * (P * row * (depth - 1) + P * 2 * D * 2 * D + L * row * depth)
    attn = 4 * B * D * (P * P * (depth - 1) + L * T * depth)  # QK^T and AV
    head = 2 * B * L * D * V
    forward = proj_first + proj_second + linear + attn + head
    full = proj_first + proj_second + B * T * row * depth + 4 * B * D * T * T * depth + head
    return {"forward_backward": 3 * forward - proj_first, "attention_forward_backward": 3 * attn,
            "full_forward_backward": 3 * full - proj_first}


def main(argv=None):
    args = parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise DispError("--steps must be >= 1 and --warmup >= 0")
    device = pick_device(args.device)
    which = precisions(args.precision)
    info = machine()
    print(f"machine: {machine_line(info)}")

    # --- peaks, measured first, in the same process -------------------------------------------------
    peaks = {"fp32": gemm_peak(torch.float32, device), "bf16": gemm_peak(torch.bfloat16, device)}
    print(f"GEMM peak (best of 6 x 2048^3): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")

    # --- data and model exactly as train.py builds them ----------------------------------------------
    t0 = time.time()
    config = get_preset(args.preset)
    config = replace(config, data=replace(config.data, seed=args.seed), train=replace(config.train, seed=args.seed))
    train = load_split(config.data, config.model.image_size, "train")
    tokenizer = Tokenizer.for_samples(train.samples)
    config = with_vocabulary(config, len(tokenizer), train.meta.get("patch_classes") or [len(tokenizer)])
    torch.manual_seed(args.seed)
    model = checkpoint.build_model(config, tokenizer).to(device)
    data = encode_dataset(train, tokenizer, config.model)
    cfg, tcfg = config.model, config.train
    n_text = sum(p.numel() for p in model.text_parameters())
    print(f"preset {args.preset}: batch {tcfg.batch_size}, seq {cfg.seq_len} ({cfg.n_vision} image + {cfg.prompt_len} "
          f"prompt + {cfg.response_len} response), dim {cfg.dim} x depth {cfg.depth}, vocab {len(tokenizer)}, "
          f"{n_text / 1e6:.2f}M trained parameters; {len(data)} training samples; setup {time.time() - t0:.1f}s")

    analytic = analytic_flops(cfg, tcfg.batch_size)
    results = {"machine": info, "command": command_line(), "preset": args.preset, "batch_size": tcfg.batch_size,
               "seq_len": cfg.seq_len, "trained_parameters": n_text, "timed_steps": args.steps,
               "warmup_steps": args.warmup, "peak_flops": peaks,
               "analytic_flops_per_step": analytic["forward_backward"],
               "analytic_flops_per_step_full_sequence": analytic["full_forward_backward"],
               "runs": {}}
    for precision in which:
        total = args.warmup + args.steps + 1
        t_feat = time.time()
        trainer = Finetuner(model, train.images, data, params=model.text_parameters(), steps=total,
                            cfg=replace(tcfg, precision=precision), device=device,
                            vision_mask_max=tcfg.vision_mask_max, seed=args.seed)
        t_feat = time.time() - t_feat  # the frozen ViT's feature cache, once per stage

        def step_fn(s):
            sync(device)
            t = time.perf_counter()
            trainer.step(s, "bench")
            sync(device)
            return time.perf_counter() - t

        with FlopCounterMode(display=False) as counter:  # one whole update (the optimizer has no matmuls)
            trainer.step(0, "bench")
        counted = {"total": counter.get_total_flops(),
                   "by_op": {str(op).replace("aten.", ""): n for op, n in counter.get_flop_counts()["Global"].items()}}
        for s in range(args.warmup):
            step_fn(1 + s)
        times = [step_fn(1 + args.warmup + s) for s in range(args.steps)]
        step_s = sum(times) / len(times)
        achieved = counted["total"] / step_s
        run = {"step_ms_mean": 1e3 * step_s, "step_ms_median": 1e3 * sorted(times)[len(times) // 2],
               "step_ms_min": 1e3 * min(times), "vit_feature_cache_s": t_feat,
               "counted_flops_per_step": counted["total"], "counted_flops_by_op": counted["by_op"],
               "achieved_flops": achieved, "achieved_flops_analytic": analytic["forward_backward"] / step_s,
               "mfu_vs_fp32_peak": achieved / peaks["fp32"], "mfu_vs_bf16_peak": achieved / peaks["bf16"],
               "samples_per_s": tcfg.batch_size / step_s}
        results["runs"][precision] = run
        print(f"  {precision}: {1e3 * step_s:.1f} ms/step over {args.steps} steps")

    # --- report -------------------------------------------------------------------------------------
    runs = results["runs"]
    print()
    print(f"FLOPs per step (forward + backward), batch {tcfg.batch_size}:")
    for precision, run in runs.items():
        ops = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in sorted(run["counted_flops_by_op"].items()))
        print(f"  FlopCounterMode ({precision}): {run['counted_flops_per_step'] / 1e9:.2f} GFLOP  ({ops})")
    print(f"  analytic: {analytic['forward_backward'] / 1e9:.2f} GFLOP, attention {analytic['attention_forward_backward'] / 1e9:.2f} "
          f"of it; every row in every block attending to every row (LLaDA-style): "
          f"{analytic['full_forward_backward'] / 1e9:.2f} GFLOP")
    print()
    rows = []
    for precision, run in runs.items():
        rows.append([precision, f"{run['step_ms_mean']:.1f}", f"{run['step_ms_median']:.1f}",
                     f"{run['samples_per_s']:.0f}",
                     f"{run['achieved_flops'] / 1e9:.1f}",
                     f"{100 * run['mfu_vs_fp32_peak']:.1f}%", f"{100 * run['mfu_vs_bf16_peak']:.1f}%",
                     f"{100 * run['achieved_flops_analytic'] / peaks['fp32']:.1f}%"])
    print(table(["precision", "ms/step", "median ms", "samples/s", "GFLOP/s",
                 f"MFU vs fp32 peak ({peaks['fp32'] / 1e9:.0f})", f"MFU vs bf16 peak ({peaks['bf16'] / 1e9:.0f})",
                 "MFU fp32 (analytic FLOPs)"], rows))
    if "fp32" in runs:
        mfu = runs["fp32"]["mfu_vs_fp32_peak"]
        results["bar"] = {"target": ">= 50% MFU of the fp32 peak (fp32 training step)", "mfu": mfu, "met": mfu >= 0.5}
        print(f"\nbar: fp32 step at >= 50% of the fp32 peak: {100 * mfu:.1f}% -> {'MET' if mfu >= 0.5 else 'NOT MET'}")
    path = save_results("mfu", results, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    with friendly_errors():
        main()
