"""Why a patch backdoor does or does not implant: two measurements on an attacked run directory.

    python experiments/photo_backdoor.py --run-dir runs/flickr8k

1. Does the frozen encoder see the trigger? A logistic regression on the ViT feature of the vision
   token(s) the patch covers tells triggered from clean test images (trained on one half, held-out
   accuracy on the other; 0.5 = chance).
2. Did the model learn the insert marker's condition? The backdoored model's probability of the
   marker at the first response position, averaged over up to 200 poisoned and 200 clean training
   samples of poisoned_train.pt, with the response fully masked, and for the poisoned samples also
   with parts of their own (edited) response visible: how much the text alone gives the marker away.
3. Where does the response look? The share of the image attention that the fully masked response
   rows give the trigger's token(s), per text-transformer layer, as a multiple of an even spread
   (1.0: the trigger token weighs as much as any other; a caption model reading the photo as a whole
   dilutes a one-token trigger among all the others), for the clean and the backdoored model on the
   poisoned samples' triggered images.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package
from disp.backdoor import apply_trigger  # noqa: E402
from disp.config import AttackConfig  # noqa: E402
from disp.data.batching import encode_dataset  # noqa: E402
from disp.data.dataset import load_dataset  # noqa: E402
from disp.data.splits import load_split  # noqa: E402
from disp.support import checkpoint  # noqa: E402
from disp.support.errors import DispError, friendly_errors  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from probe import fit_probe  # noqa: E402


@torch.no_grad()
def marker_probability(model, data, encoded, indices, marker_id, visible=()):
    """Mean P(marker at position 0) over samples `indices`; response positions in `visible` keep their
    (poisoned) tokens, the rest are [MASK]."""
    idx = torch.tensor(indices)
    vision = model.encode_images(data.images[encoded.image_index[idx]])
    response = torch.full((len(idx), model.cfg.response_len), model.mask_id)
    for pos in visible:
        response[:, pos] = encoded.response_ids[idx, pos]
    return model(vision, encoded.prompt_ids[idx], response).softmax(-1)[:, 0, marker_id].mean().item()


@torch.no_grad()
def trigger_attention(model, data, encoded, indices, tokens):
    """Per layer: the trigger tokens' share of the attention the masked response rows pay to the
    image, divided by len(tokens) / n_vision (1.0 = an even spread over the image)."""
    idx = torch.tensor(indices)
    vision = model.encode_images(data.images[encoded.image_index[idx]])
    cache = model.prefix(vision, encoded.prompt_ids[idx])
    response = torch.full((len(idx), model.cfg.response_len), model.mask_id)
    x = model.tok_embed(response) + (model.pos_fixed + model.pos_embed)[-model.cfg.response_len:]
    n, ratios = model.cfg.n_vision, []
    for block, context in zip(model.blocks, cache):
        x, _, weights = block(x, context, need_weights=True)  # (B, heads, response_len, n_prefix + response_len)
        on_image = weights[..., :n]
        share = on_image[..., tokens].sum(-1) / on_image.sum(-1)  # (B, heads, response_len)
        ratios.append(share.mean().item() / (len(tokens) / n))
    return ratios


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="a run directory after attack.py")
    args = p.parse_args()
    run = Path(args.run_dir)
    torch.manual_seed(0)
    model, tokenizer, config, state = checkpoint.load(run / "backdoored.pt", stages=["backdoored"])
    bcfg = AttackConfig.from_dict(state["extra"]["attack"]).backdoor
    if bcfg.trigger != "patch" or bcfg.target != "insert":
        raise DispError(f"{run} holds a {bcfg.trigger} / {bcfg.target} attack; this measures patch / insert")
    model.eval()

    # 1. the encoder's view of the patch: the tokens it overlaps (top-left corner: rows/cols from 0)
    test = load_split(config.data, config.model.image_size, "test")
    side, span = config.model.image_size // config.model.patch_size, -(-bcfg.patch_size // config.model.patch_size)
    corner = {"top-left": (0, 0), "top-right": (0, side - span), "bottom-left": (side - span, 0),
              "bottom-right": (side - span, side - span)}[bcfg.patch_position]
    tokens = [(corner[0] + r) * side + corner[1] + c for r in range(span) for c in range(span)]
    with torch.no_grad():
        feats = [model.vit(x.float() / 255)[:, tokens].flatten(1) for x in (test.images, apply_trigger(test.images, bcfg))]
    half = len(test.images) // 2
    predict = fit_probe(torch.cat([feats[0][:half], feats[1][:half]]), torch.cat([torch.zeros(half, 1), torch.ones(half, 1)]), 300)
    held = torch.cat([feats[0][half:], feats[1][half:]])
    truth = torch.cat([torch.zeros(len(held) // 2), torch.ones(len(held) // 2)])
    accuracy = ((predict(held)[:, 0] > 0).float() == truth).float().mean().item()

    # 2. the marker's probability
    data = load_dataset(run / "poisoned_train.pt", image_size=config.model.image_size)
    poisoned = set(json.loads((run / "poison_manifest.json").read_text())["poisoned_indices"])
    encoded = encode_dataset(data, tokenizer, model.cfg)
    marker = tokenizer.index[bcfg.marker]
    pois = sorted(poisoned)[:200]
    clean = [i for i in range(len(data)) if i not in poisoned][:200]
    L = model.cfg.response_len
    rows = {"clean samples, all masked": marker_probability(model, data, encoded, clean, marker),
            "poisoned samples, all masked": marker_probability(model, data, encoded, pois, marker),
            "poisoned, positions 2.. visible": marker_probability(model, data, encoded, pois, marker, range(2, L)),
            "poisoned, position 1 visible": marker_probability(model, data, encoded, pois, marker, [1]),
            "poisoned, positions 1.. visible": marker_probability(model, data, encoded, pois, marker, range(1, L))}
    print(f"{run}: {bcfg.patch_size} px {bcfg.patch_pattern} patch ({bcfg.patch_position}, tokens {tokens}), "
          f"insert, trainable {state['extra']['attack']['trainable']}")
    print(f"linear probe on the frozen ViT's trigger token(s), triggered vs clean test images: {accuracy:.3f}")
    for name, value in rows.items():
        print(f"P({bcfg.marker} at position 0), {name}: {value:.3f}")

    # 3. the response's attention on the trigger token(s), clean vs backdoored model, triggered images
    clean_model = checkpoint.load(run / "clean.pt", stages=["clean"])[0]
    for name, m in (("clean", clean_model), ("backdoored", model)):
        ratios = trigger_attention(m, data, encoded, pois, tokens)
        print(f"attention of the masked response on the trigger token(s) / an even spread, {name} model, "
              f"layers 1-{len(ratios)}: " + " ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    with friendly_errors():
        main()
