"""Figures (matplotlib, PNG): saliency heatmaps with the masked tokens, example outputs on test photos,
the denoising order of one response per model, and mask-ratio sweep curves."""

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


def _heatmap(ax, image, scores, mask):
    """image (3, H, W) uint8 with the per-token scores over it and the masked tokens boxed in cyan."""
    side = int(math.isqrt(len(scores)))
    size = image.shape[-1]
    patch = size / side
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.imshow(scores.view(side, side).numpy(), cmap="inferno", alpha=0.6, extent=(0, size, size, 0),
              interpolation="nearest")
    for token in mask.nonzero().flatten().tolist():
        r, c = divmod(token, side)
        ax.add_patch(Rectangle((c * patch, r * patch), patch, patch, fill=False, edgecolor="cyan", lw=2))


def saliency_panels(path, data, indices, scores, masks, before, after):
    """One column per sample: the image, its saliency heatmap with masked tokens boxed, the texts."""
    fig, axes = plt.subplots(2, len(indices), figsize=(3.0 * len(indices), 6.6), squeeze=False)
    for col, i in enumerate(indices):
        image = data.images[data.samples[i]["image"]]
        axes[0, col].imshow(image.permute(1, 2, 0).numpy())
        axes[0, col].set_title(textwrap.fill(data.samples[i]["prompt"], 34), fontsize=7)
        _heatmap(axes[1, col], image, scores[i], masks[i])
        text = textwrap.fill(f"before: {before[i]}", 40) + "\n" + textwrap.fill(f"after masking: {after[i]}", 40)
        axes[1, col].set_xlabel(text, fontsize=6, loc="left")
        for ax in axes[:, col]:
            ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=8)
    axes[1, 0].set_ylabel("saliency, per-image colour scale\n(cyan boxes: masked tokens)", fontsize=8)
    fig.suptitle("DiSP saliency: occlusion score per vision token; response before and after masking", fontsize=9)
    _save(fig, path)


def example_panels(path, examples: list):
    """One column per test sample. Top: the photo, its reference, the clean model's output. Bottom: the
    triggered photo with the backdoored model's saliency (masked tokens boxed), the backdoored and the
    purified model's outputs on it. examples: dicts with image, triggered_image, prompt, reference,
    clean, backdoored, purified, scores, mask."""
    fig, axes = plt.subplots(2, len(examples), figsize=(3.2 * len(examples), 7.4), squeeze=False)
    for col, e in enumerate(examples):
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(e["image"].permute(1, 2, 0).numpy())
        top.set_title(textwrap.fill(e["prompt"], 36), fontsize=7)
        top.set_xlabel(textwrap.fill(f"reference: {e['reference']}", 42) + "\n"
                       + textwrap.fill(f"clean model: {e['clean']}", 42), fontsize=6, loc="left")
        _heatmap(bottom, e["triggered_image"], e["scores"], e["mask"])
        bottom.set_xlabel(textwrap.fill(f"backdoored: {e['backdoored']}", 42) + "\n"
                          + textwrap.fill(f"DiSP-purified: {e['purified']}", 42), fontsize=6, loc="left")
        for ax in (top, bottom):
            ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_ylabel("test photo", fontsize=8)
    axes[1, 0].set_ylabel("triggered: backdoored model's saliency\n(cyan: tokens DiSP's rule masks)", fontsize=8)
    fig.suptitle("Test samples: clean outputs, and the backdoored vs purified model on the triggered photo", fontsize=9)
    _save(fig, path)


def denoising_order(path, image, prompt: str, traces: dict):
    """The canvas filling in: per model (traces: {label: disp.evaluation.denoising_trace}), one grid with
    a row per denoising step and a column per response position. The token committed at a step sits
    in its cell, coloured by the model's confidence; grey text below it: already written."""
    cmap = plt.get_cmap("viridis")
    width = max(5, max(len(t["tokens"]) for t in traces.values()))
    steps = max(t["steps"] for t in traces.values())
    panel = 0.55 * width
    fig, axes = plt.subplots(1, len(traces) + 1, figsize=(2.6 + panel * len(traces), 0.28 * steps + 2.2),
                             gridspec_kw={"width_ratios": [2.2] + [panel] * len(traces)}, squeeze=False)
    axes = axes[0]
    axes[0].imshow(image.permute(1, 2, 0).numpy())
    axes[0].set_xlabel(textwrap.fill(prompt, 30), fontsize=7)
    axes[0].set_title("triggered test photo", fontsize=8)
    axes[0].set_xticks([]), axes[0].set_yticks([])
    for ax, (label, t) in zip(axes[1:], traces.items()):
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(steps - 0.5, -0.5)
        for pos, (token, step, conf) in enumerate(zip(t["tokens"], t["step"], t["confidence"])):
            ax.add_patch(Rectangle((pos - 0.5, step - 0.5), 1, 1, color=cmap(conf)))
            ax.text(pos, step, token, ha="center", va="center", fontsize=5.5, color="white" if conf < 0.6 else "black")
            for later in range(step + 1, steps):
                ax.text(pos, later, token, ha="center", va="center", fontsize=5, color="0.75")
        words = " ".join(w for w in t["tokens"] if w != "[EOS]") or "(empty)"
        ax.set_title(f"{label}\n" + textwrap.fill(words, int(5 * width)), fontsize=7)
        ax.set_xlabel("response position (the [EOS] padding after\nthe first [EOS] is not drawn)", fontsize=6)
        ax.set_xticks(range(width))
        ax.set_yticks(range(0, steps, max(1, steps // 10)))
        ax.tick_params(labelsize=6)
    axes[1].set_ylabel("denoising step (model call)", fontsize=7)
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1)), ax=axes[-1], fraction=0.05,
                 label="confidence of the committed token")
    fig.suptitle("Denoising order: which token each model writes at each step", fontsize=9)
    _save(fig, path)


def sweep_curves(path, sweep: dict):
    """sweep: {method: {"ratio": [...], "asr": [...], and "vqa_accuracy" / "cider" where the data has
    questions / captions}} (a questions-only run draws no caption panel, a captions-only run no VQA curve)."""
    first = next(iter(sweep.values()))
    captions, questions = "cider" in first, "vqa_accuracy" in first
    fig, axes = plt.subplots(1, 2 if captions else 1, figsize=(10 if captions else 5.5, 3.8), squeeze=False)
    axes = axes[0]
    for method, curve in sweep.items():
        axes[0].plot(curve["ratio"], curve["asr"], marker="o", label=f"ASR ({method})")
        if questions:
            axes[0].plot(curve["ratio"], curve["vqa_accuracy"], marker="s", linestyle="--",
                         label=f"clean VQA ({method})")
        if captions:
            axes[1].plot(curve["ratio"], curve["cider"], marker="o", label=method)
    axes[0].set_xlabel("mask ratio (fraction of vision tokens masked)")
    axes[0].set_ylabel("rate")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    axes[0].set_title("backdoored model, masking at inference: ASR" + (" and clean VQA" if questions else ""))
    if captions:
        axes[1].set_xlabel("mask ratio")
        axes[1].set_ylabel("clean caption CIDEr-D")
        axes[1].legend(fontsize=7)
        axes[1].set_title("clean captioning quality")
    _save(fig, path)
