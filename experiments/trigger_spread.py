"""Where a patch backdoor lives in a backdoored run: in the trigger's own vision token, or spread
over all of them by the frozen ViT's attention?

    python experiments/trigger_spread.py runs/flickr-v4 runs/flickr-v4-s1

For each run directory (backdoored.pt with a patch trigger), on the first --samples triggered test
samples the trigger applies to:
  spread   how far the trigger moves each output token of the ViT and of the projector: the distance
           between the triggered and the clean images' mean token, over the clean tokens' spread
           (norm of the per-dimension standard deviations), for the trigger's token and the median
           of the others
  rank     how often the trigger's token has the highest occlusion saliency, masking the token alone
           (`purify.py --masking token`) and painting its patch too (the default, --masking patch)
  ASR      with nothing masked, the trigger's token masked alone, and masked with its patch painted
           flat before the ViT (disp.model.paint_patches)
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package
from disp.backdoor import (BackdoorConfig, apply_trigger, asr_eligible, attack_success_rate, trigger_tokens,  # noqa: E402
                           triggered_copy)
from disp.data.splits import load_split  # noqa: E402
from disp.evaluation import generate_responses, token_scores  # noqa: E402
from disp.support import checkpoint  # noqa: E402
from disp.support.errors import DispError, friendly_errors  # noqa: E402


@torch.no_grad()
def spread(model, images, b: BackdoorConfig, own: list) -> dict:
    """{"vit" / "projected": (trigger token's shift, the other tokens' median shift)} in clean spreads."""
    clean, triggered = model.to_float(images), model.to_float(apply_trigger(images, b))
    out = {}
    for name, encode in (("vit", model.vit), ("projected", lambda x: model.projector(model.vit(x)))):
        c, t = encode(clean), encode(triggered)
        shift = (t - c).mean(0).norm(dim=-1) / c.std(0).norm(dim=-1)  # (n_vision,)
        others = torch.ones(len(shift), dtype=torch.bool)
        others[own] = False
        out[name] = (shift[own].mean().item(), shift[others].median().item())
    return out


def measure(run_dir: Path, samples: int) -> dict:
    model, tokenizer, config, state = checkpoint.load(run_dir / "backdoored.pt", stages=["backdoored"])
    b = BackdoorConfig.from_dict(state["extra"]["attack"]["backdoor"])
    if b.trigger != "patch":
        raise DispError(f"{run_dir} has a {b.trigger} trigger; this experiment needs a patch trigger")
    test = load_split(config.data, config.model.image_size, "test")
    own = trigger_tokens(b, config.model.image_size, config.model.patch_size)
    triggered = triggered_copy(test, b)
    idx = asr_eligible(test.samples, b)[:samples]
    result = {"spread": spread(model, test.images[:500], b, own)}
    for masking in ("token", "patch"):
        s = token_scores(model, tokenizer, triggered, idx, "kl", paint=masking == "patch")
        result[f"rank ({masking})"] = (s.argmax(1)[:, None] == torch.tensor(own)).any(1).float().mean().item()
    masks = torch.zeros(len(triggered.samples), config.model.n_vision, dtype=torch.bool)
    masks[:, own] = True
    for label, kw in (("none", {}), ("token", {"vision_masks": masks}), ("patch", {"vision_masks": masks, "paint": True})):
        result[f"ASR ({label})"] = attack_success_rate(generate_responses(model, tokenizer, triggered, idx, **kw),
                                                       [test.samples[i]["response"] for i in idx], b)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories holding backdoored.pt (patch trigger)")
    p.add_argument("--samples", type=int, default=200, help="triggered test samples (default 200)")
    args = p.parse_args()
    print("| run | trigger token's shift (ViT / projected) | other tokens' median shift | trigger token top-1: "
          "token / patch masking | ASR: nothing / token / patch masked |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        r = measure(Path(run), args.samples)
        (vo, vr), (po, pr) = r["spread"]["vit"], r["spread"]["projected"]
        print(f"| {run} | {vo:.2f} / {po:.2f} | {vr:.2f} / {pr:.2f} | {r['rank (token)']:.2f} / {r['rank (patch)']:.2f} "
              f"| {r['ASR (none)']:.3f} / {r['ASR (token)']:.3f} / {r['ASR (patch)']:.3f} |", flush=True)


if __name__ == "__main__":
    with friendly_errors():
        main()
