"""Why token masking cannot reach a trigger spread over the whole image: at test time, hide the same
tokens of each image by [MASK] or by dilution (their position's median token) and compare.

    python experiments/mask_vs_dilute.py --run-dir runs/grid/blended-insert

For a backdoored model (RUN_DIR/backdoored.pt) and each keep fraction, every test image keeps its
least typical vision tokens (farthest from their position's median token; the median is taken over
the poisoned fine-tuning set's images, the defender's data) and the other tokens are either
[MASK]ed or replaced by the median token. Prints ASR on the triggered test images and clean
CIDEr-D / VQA accuracy on the untriggered ones, for each way; nothing is trained.

Dilution was once an option of purify.py; it is kept here, self-contained, as the experiment that
showed why it fell short on the default encoder (experiments/README.md).
"""

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package
import torch  # noqa: E402

from disp.backdoor import triggered_copy  # noqa: E402
from disp.config import AttackConfig  # noqa: E402
from disp.data.batching import encode_dataset  # noqa: E402
from disp.data.dataset import load_dataset  # noqa: E402
from disp.data.splits import load_split  # noqa: E402
from disp.evaluation import backdoor_metrics, encode_images_once  # noqa: E402
from disp.support import checkpoint  # noqa: E402
from disp.support.errors import DispError, check_ratio, friendly_errors  # noqa: E402
from disp.support.runtime import autocast  # noqa: E402


def median_tokens(vision_tokens):
    """(n_vision, dim): per image position, the coordinate-wise median of (N, n_vision, dim) tokens.
    A median, not a mean, so that a trigger carried by fewer than half the images leaves no trace."""
    return vision_tokens.median(dim=0).values


def select_typical(vision_tokens, median, keep: float):
    """(B, n_vision) bool: the tokens dilution replaces, all but each image's ceil(keep * n_vision)
    tokens farthest (L2) from their position's median token."""
    check_ratio("dilution keep fraction", keep)
    B, N, _ = vision_tokens.shape
    k = math.ceil(keep * N)
    distance = (vision_tokens - median).float().norm(dim=-1)  # (B, N)
    typical = torch.ones(B, N, dtype=torch.bool, device=vision_tokens.device)
    if k > 0:
        typical.scatter_(1, distance.topk(k, dim=1).indices, False)
    return typical


def dilute(vision_tokens, median, keep: float):
    """Dilution: (B, n_vision, dim) tokens -> the same, where each image keeps the ceil(keep * n_vision)
    tokens farthest (L2) from their position's median token and every other token becomes that median.

    Why not [MASK]: a trigger spread over every token (blended noise, a sinusoid, a warp) adds a little
    evidence at each position, and a [MASK]ed position is simply not looked at, so what the model reads
    from the remaining tokens still carries the trigger. A median token is looked at and carries none:
    the trigger's share of what the model reads falls with every replaced token. The kept tokens are
    the image's unusual ones, its content; its typical ones (background) carry no answer.
    """
    typical = select_typical(vision_tokens, median, keep)
    return torch.where(typical[..., None], median.to(vision_tokens.dtype), vision_tokens)


def hidden_positions(model, dataset, median, keep: float):
    """(N_samples, n_vision) bool: the positions dilution would replace, per sample's image."""
    image = torch.tensor([s["image"] for s in dataset.samples])
    tokens, rows = encode_images_once(model, dataset, image, "cpu")
    return select_typical(tokens, median, keep)[rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run directory with backdoored.pt and poisoned_train.pt")
    p.add_argument("--keep", default="0.25,0.5", help="comma-separated keep fractions (default 0.25,0.5)")
    p.add_argument("--eval-samples", type=int, default=200, help="test samples measured (default 200)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    model, tokenizer, config, state = checkpoint.load(run_dir / "backdoored.pt", stages=["backdoored"])
    attack = AttackConfig.from_dict(state["extra"]["attack"])
    try:
        keeps = [float(k) for k in args.keep.split(",")]
    except ValueError:
        raise DispError(f"--keep takes comma-separated fractions such as 0.25,0.5, got {args.keep!r}") from None
    if not all(0 <= k <= 1 for k in keeps):
        raise DispError(f"--keep fractions must be in [0, 1], got {args.keep}")
    data = load_dataset(run_dir / "poisoned_train.pt", image_size=config.model.image_size)
    test = load_split(config.data, config.model.image_size, "test")
    triggered = triggered_copy(test, attack.backdoor)
    with torch.no_grad(), autocast(torch.device("cpu"), attack.precision):
        vision, rows = encode_images_once(model, data, encode_dataset(data, tokenizer, config.model).image_index, "cpu")
        median = median_tokens(vision[rows])
        print(f"{run_dir}: {attack.backdoor.trigger} trigger, {attack.backdoor.target} target; first "
              f"{args.eval_samples} test samples")
        print("| tokens hidden by | keep | ASR | false trigger | CIDEr-D | VQA |\n|---|---:|---:|---:|---:|---:|")
        rows_out = [("nothing", 1.0, backdoor_metrics(model, tokenizer, test, attack.backdoor,
                                                      limit=args.eval_samples, triggered=triggered))]
        for keep in keeps:
            masks = {name: hidden_positions(model, d, median, keep) for name, d in (("clean", test),
                                                                                     ("triggered", triggered))}
            rows_out.append(("[MASK]", keep, backdoor_metrics(
                model, tokenizer, test, attack.backdoor, limit=args.eval_samples, triggered=triggered,
                clean_masks=masks["clean"], triggered_masks=masks["triggered"])))
            rows_out.append(("median token (dilution)", keep, backdoor_metrics(
                model, tokenizer, test, attack.backdoor, limit=args.eval_samples, triggered=triggered,
                vision_transform=lambda tokens, keep=keep: dilute(tokens, median, keep))))
    for how, keep, m in rows_out:
        print(f"| {how} | {keep:.2f} | {m['asr']:.3f} | {m['false_trigger_rate']:.3f} | {m.get('cider', 0):.3f} | "
              f"{m.get('vqa_accuracy', 0):.3f} |")


if __name__ == "__main__":
    with friendly_errors():
        main()
