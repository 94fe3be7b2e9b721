"""Attention, timed in three forms: the model's (disp.model.attention: the prefix's keys and values
scored apart, never concatenated), the textbook form (disp.model.plain_attention: concatenated, one
softmax), and F.scaled_dot_product_attention on the concatenated keys and values.

    python bench/attention.py                      # cpu preset, fp32 and bf16 side by side
    python bench/attention.py --precision fp32 --repeats 10

Two measurements per form and precision, on fresh cpu-preset weights and the real encoded training
split: one training update (disp.training.Finetuner.step, batch 64, as train.py's clean SFT) and
one denoising step of 256 samples (DiffusionVLM.decode on a cached prefix, what every step of
generate runs). Each figure is the median of --repeats timings after a warm-up. The bench swaps the
form in through disp.model.attention; all three give the same outputs (checked here first).
"""

import argparse
import statistics
import time
from dataclasses import replace

from _common import (add_common_options, command_line, machine, machine_line, pick_device, precisions, save_results,
                     sync, table)

import torch  # noqa: E402  (after _common, which puts the repository on sys.path)

from disp.config import get_preset, with_vocabulary  # noqa: E402
from disp.data.batching import encode_dataset  # noqa: E402
from disp.data.splits import load_split  # noqa: E402
from disp.data.tokenizer import Tokenizer  # noqa: E402
import disp.model  # noqa: E402
from disp.support import checkpoint  # noqa: E402
from disp.support.errors import DispError, friendly_errors  # noqa: E402
from disp.support.runtime import autocast  # noqa: E402
from disp.training import Finetuner  # noqa: E402

import torch.nn.functional as F  # noqa: E402


def sdpa(q, k, v, context=None):
    """The same attention through F.scaled_dot_product_attention (no weights returned)."""
    if context is not None:
        k = torch.cat([context[0].expand(q.shape[0], -1, -1, -1), k], dim=2)
        v = torch.cat([context[1].expand(q.shape[0], -1, -1, -1), v], dim=2)
    return F.scaled_dot_product_attention(q, k, v), None


MODEL_FORM = disp.model.attention
FORMS = {"split (the model's)": MODEL_FORM, "plain (concatenated)": disp.model.plain_attention,
         "F.scaled_dot_product_attention": sdpa}


def check_same_outputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=g) for _ in range(3))
    context = (torch.randn(1, 2, 7, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g))
    for form in FORMS.values():
        for ctx in (None, context):
            torch.testing.assert_close(form(q, k, v, ctx)[0], MODEL_FORM(q, k, v, ctx)[0], atol=1e-5, rtol=1e-4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help="model/batch preset (default: cpu)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per measurement (median reported)")
    add_common_options(p, "attention")
    return p.parse_args(argv)


def median_ms(fn, repeats, device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    if args.repeats < 1:
        raise DispError("--repeats must be >= 1")
    device = pick_device(args.device)
    check_same_outputs()
    info = machine()
    print(f"machine: {machine_line(info)}")
    config = get_preset(args.preset)
    train = load_split(config.data, config.model.image_size, "train")
    tokenizer = Tokenizer.for_samples(train.samples)
    config = with_vocabulary(config, len(tokenizer), train.meta.get("patch_classes") or [len(tokenizer)])
    torch.manual_seed(0)
    model = checkpoint.build_model(config, tokenizer).to(device)
    data = encode_dataset(train, tokenizer, config.model)
    n = 256
    response = torch.full((n, config.model.response_len), tokenizer.mask_id, device=device)
    results = {"machine": info, "command": command_line(), "preset": args.preset, "repeats": args.repeats, "runs": {}}
    rows = []
    for precision in precisions(args.precision):
        trainer = Finetuner(model, train.images, data, params=model.text_parameters(), steps=1000,
                            cfg=replace(config.train, precision=precision), device=device, seed=0)
        with torch.no_grad(), autocast(device, precision):
            model.eval()
            vision = model.encode_images(train.images[:n].to(device))
            cache = model.prefix(vision, data.prompt_ids[:n].to(device))
        for name, form in FORMS.items():
            disp.model.attention = form
            step = iter(range(10_000))
            train_ms = median_ms(lambda: trainer.step(next(step), "bench"), args.repeats, device)

            def decode():
                with torch.no_grad(), autocast(device, precision):
                    model.decode(cache, response)

            decode_ms = median_ms(decode, args.repeats, device)
            results["runs"][f"{precision} {name}"] = {"train_step_ms": train_ms, "decode_step_ms": decode_ms}
            rows.append([precision, name, f"{train_ms:.1f}", f"{decode_ms:.1f}"])
            print(f"  {precision} {name}: training step {train_ms:.1f} ms, denoising step ({n} samples) {decode_ms:.1f} ms")
    disp.model.attention = MODEL_FORM
    print()
    print(table(["precision", "attention", "training step ms (batch 64)", f"denoising step ms ({n} samples)"], rows))
    path = save_results("attention", results, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    with friendly_errors():
        main()
