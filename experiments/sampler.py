"""How the sampler writes a caption: block length and guidance on the image, measured on clean models.

    python experiments/sampler.py --checkpoints runs/levers/base/clean.pt,runs/levers-s1/base/clean.pt \
        --blocks 0,2,4,5,10 --guidance 0,0.06,0.3,1

For each clean.pt (a caption model: Flickr8k, COCO, ...) and each setting, low-confidence
decoding of the captions of --val-images images of the val split (this is where a setting is chosen;
`--split test` then checks the chosen one on the test images, as evaluate.py scores them), scored
by CIDEr-D, BLEU-4 and the number of distinct captions, with the seconds the ViT and the sampler took.
    block     LLaDA's semi-autoregressive decoding: the response is written this many tokens at a
              time, left to right, each block by confidence (0: one block, the whole response);
              train.py's --block-length stores the choice in clean.pt
    guidance  classifier-free guidance on the image (DDCap, Zhu et al. 2022): at every step the logits
              are log p(x | image) + w (log p(x | image) - log p(x | no image)), "no image" being every
              vision token masked (disp.diffusion.generate's guidance); w 0 is plain decoding. A model
              trained with train.py --image-free has seen that input; one trained without it has not.
              Costs a second forward pass per step.
    temperature  each token drawn at this temperature (Gumbel noise, seeded: the same on every run);
              0 is greedy. train.py's --temperature stores the choice in clean.pt
    per step  tokens committed at each denoising step (1, every stage's sampler: one model call per
              token; 2 halves the calls)
Writes --out (JSON) and prints a table.
"""

import argparse
import itertools
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package

from disp.data.batching import encode_dataset  # noqa: E402
from disp.data.splits import load_split  # noqa: E402
from disp.diffusion import generate  # noqa: E402
from disp.evaluation import distinct_rows, encode_images_once, sampling_noise, score  # noqa: E402
from disp.support import checkpoint  # noqa: E402
from disp.support.errors import DispError, check_positive, friendly_errors  # noqa: E402
from disp.support.files import write_json  # noqa: E402
from disp.support.runtime import autocast  # noqa: E402


def caption_quality(model, tokenizer, data, precision, block_length: int, guidance: float, temperature=0.0,
                    per_step=1, batch_size=256) -> dict:
    encoded = encode_dataset(data, tokenizer, model.cfg)
    indices = [i for i, s in enumerate(data.samples) if s["task"] == "caption"]
    firsts, group = distinct_rows(encoded, indices)  # an image's captions share one prompt
    out, start = [], time.perf_counter()
    generator = sampling_noise(temperature, "cpu")  # seeded, as every stage's: the same on every run
    with autocast("cpu", precision):
        vision, row = encode_images_once(model, data, encoded.image_index[firsts], "cpu")
        for s in range(0, len(firsts), batch_size):
            n = model.cfg.response_len
            ids = generate(model, None, encoded.prompt_ids[firsts[s:s + batch_size]], gen_length=n, steps=n // per_step,
                           block_length=block_length or n, vision_tokens=vision[row[s:s + batch_size]], guidance=guidance,
                           temperature=temperature, generator=generator)
            out += [tokenizer.decode(r) for r in ids]
    seconds = time.perf_counter() - start  # the ViT and the sampler, not the scoring
    result = score(data, indices, [out[g] for g in group.tolist()])
    return {**{k: result[k] for k in ("cider", "bleu4", "distinct_captions")}, "seconds": seconds}


def numbers(text: str, kind, name: str) -> list:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise DispError(f"{name} takes comma-separated numbers such as 0,4, got {text!r}") from None
    for v in values:
        check_positive(name, v, allow_zero=True)
    return values


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", required=True, help="comma-separated clean.pt files of caption models")
    p.add_argument("--blocks", default="0,4", help="block lengths (0: the whole response), comma-separated")
    p.add_argument("--guidance", default="0", help="guidance scales w (0: none), comma-separated")
    p.add_argument("--temperature", default="0",
                   help="sampling temperatures (0: greedy), comma-separated: the Gumbel noise on each token's choice")
    p.add_argument("--per-step", default="1",
                   help="tokens committed per denoising step, comma-separated (default 1: one step per token)")
    p.add_argument("--val-images", type=int, default=500, help="val images captioned (default 500)")
    p.add_argument("--split", default="val", choices=["val", "test"], help="val (default) | test (every test image)")
    p.add_argument("--out", default="runs/sampler.json", help="where the results go (JSON)")
    args = p.parse_args(argv)
    blocks, scales = numbers(args.blocks, int, "--blocks"), numbers(args.guidance, float, "--guidance")
    temperatures = numbers(args.temperature, float, "--temperature")
    per_steps = numbers(args.per_step, int, "--per-step")
    check_positive("--val-images", args.val_images)
    header = f"| checkpoint | block | guidance | temperature | tokens per step | {args.split} CIDEr-D | {args.split} BLEU-4 | distinct captions | seconds |"
    results, lines = {}, [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    models = {path: checkpoint.load(Path(path), stages=["clean"]) for path in args.checkpoints.split(",")}
    for path, (_, _, config, _) in models.items():  # every setting checked before any caption is written
        n = config.model.response_len
        for block in blocks:
            if block and n % block:
                raise DispError(f"--blocks {block} does not divide {path}'s response length {n}")
            for k in per_steps:
                if not k or (block or n) % k:
                    raise DispError(f"--per-step {k} must divide the block length {block or n} of {path}")
    for path, (model, tokenizer, config, _) in models.items():
        data = load_split(replace(config.data, val_images=args.val_images), config.model.image_size, args.split)
        for block in blocks:
            for w in scales:
                for t, k in itertools.product(temperatures, per_steps):
                    r = caption_quality(model, tokenizer, data, config.train.precision, block, w, t, k)
                    results[f"{path} {args.split} block={block} guidance={w} temperature={t} per_step={k}"] = r
                    lines.append(f"| {path} | {block or 'all'} | {w} | {t} | {k} | {r['cider']:.3f} | {r['bleu4']:.3f} | "
                                 f"{r['distinct_captions']} | {r['seconds']:.1f} |")
                    print(lines[-1], flush=True)
    write_json(Path(args.out), results)
    print("\n".join(lines))


if __name__ == "__main__":
    with friendly_errors():
        main()
