"""Figures (matplotlib, PNG): saliency heatmaps with the masked tokens, and mask-ratio sweep curves."""

import math
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only, no screen needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from disp.support.files import atomic_write  # noqa: E402


def _save(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def saliency_panels(path, data, indices, scores, masks, before, after, n_vision):
    """One column per sample: the image, its saliency heatmap with masked tokens boxed, the texts."""
    side = int(math.isqrt(n_vision))
    fig, axes = plt.subplots(2, len(indices), figsize=(3.0 * len(indices), 6.6), squeeze=False)
    for col, i in enumerate(indices):
        image = data.images[data.samples[i]["image"]].permute(1, 2, 0).numpy()
        size = image.shape[0]
        patch = size / side
        axes[0, col].imshow(image)
        axes[0, col].set_title(textwrap.fill(data.samples[i]["prompt"], 34), fontsize=7)
        axes[1, col].imshow(image)
        heat = scores[i].view(side, side).numpy()
        axes[1, col].imshow(heat, cmap="inferno", alpha=0.6, extent=(0, size, size, 0), interpolation="nearest")
        for token in masks[i].nonzero().flatten().tolist():
            r, c = divmod(token, side)
            axes[1, col].add_patch(Rectangle((c * patch, r * patch), patch, patch, fill=False, edgecolor="cyan", lw=2))
        text = textwrap.fill(f"before: {before[i]}", 40) + "\n" + textwrap.fill(f"after masking: {after[i]}", 40)
        axes[1, col].set_xlabel(text, fontsize=6, loc="left")
        for ax in axes[:, col]:
            ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=8)
    axes[1, 0].set_ylabel("saliency, per-image colour scale\n(cyan boxes: masked tokens)", fontsize=8)
    fig.suptitle("DiSP saliency: occlusion score per vision token; response before and after masking", fontsize=9)
    _save(fig, path)


def sweep_curves(path, sweep: dict):
    """sweep: {method: {"ratio": [...], "asr": [...], "vqa_accuracy": [...], "cider": [...]}}."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, curve in sweep.items():
        axes[0].plot(curve["ratio"], curve["asr"], marker="o", label=f"ASR ({method})")
        axes[0].plot(curve["ratio"], curve["vqa_accuracy"], marker="s", linestyle="--", label=f"clean VQA ({method})")
        axes[1].plot(curve["ratio"], curve["cider"], marker="o", label=method)
    axes[0].set_xlabel("mask ratio (fraction of vision tokens masked)")
    axes[0].set_ylabel("rate")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    axes[0].set_title("backdoored model, masking at inference: ASR and clean VQA")
    axes[1].set_xlabel("mask ratio")
    axes[1].set_ylabel("clean caption CIDEr-D")
    axes[1].legend(fontsize=7)
    axes[1].set_title("clean captioning quality")
    _save(fig, path)
