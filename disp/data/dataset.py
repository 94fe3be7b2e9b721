"""The one in-memory format of every data source, `VLDataset`, and its file format.

Every source (the scene generator in `disp/data/scenes.py`, the public-data readers in
`disp/data/readers.py`) ends up as a `VLDataset`: a uint8 image tensor plus a list of samples, each a
(prompt, response) pair that points at one image. attack.py and purify.py save the datasets they
make (the poisoned and the purified fine-tuning sets) with `save_dataset`; later stages read them
back with `load_dataset`, which checks their structure.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from disp.support.errors import DispError
from disp.support.files import atomic_write, load_plain

CAPTION_PROMPT = "describe the image ."


@dataclass
class VLDataset:
    """Images plus (prompt -> response) samples.

    images:  (N_images, 3, H, W) uint8
    samples: list of dicts with keys
        image    int, index into images
        task     str, the prompt type ("caption", or a question kind such as "color", "vqa")
        prompt   str, normalised text (lower case, punctuation split off)
        response str, the training target (normalised)
        answers  list[str], evaluation references: all captions of the image, or all VQA answers
    patch_labels: optional (N_images, n_patches, n_attributes) long, per-patch attribute classes
        for vision-encoder pretraining (only the scene generator knows them)
    """

    images: torch.Tensor
    samples: list
    patch_labels: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.samples)


def drop_first_images(dataset: VLDataset, n: int) -> VLDataset:
    """The dataset without its first n images and their samples (image indices renumbered)."""
    samples = [{**s, "image": s["image"] - n} for s in dataset.samples if s["image"] >= n]
    labels = None if dataset.patch_labels is None else dataset.patch_labels[n:]
    meta = dict(dataset.meta)
    if "image_files" in meta:
        meta["image_files"] = meta["image_files"][n:]
    return VLDataset(dataset.images[n:], samples, labels, meta)


def one_sample_per_prompt(dataset: VLDataset) -> VLDataset:
    """The dataset with only the first sample of each (image, prompt) pair: an evaluation split asks
    each question once (an image's 5 captions are one caption sample, all 5 kept as its answers)."""
    seen, samples = set(), []
    for s in dataset.samples:
        if (s["image"], s["prompt"]) not in seen:
            seen.add((s["image"], s["prompt"]))
            samples.append(s)
    return VLDataset(dataset.images, samples, dataset.patch_labels, dict(dataset.meta))


def check_not_empty(dataset: VLDataset, source: str) -> VLDataset:
    if len(dataset.samples) == 0:
        raise DispError(f"{source} holds no samples; check the path and the split")
    return dataset


# ---------------------------------------------------------------------------------------------
# Dataset files (the poisoned training set, the purified set): plain tensors and data
# ---------------------------------------------------------------------------------------------

def save_dataset(path, dataset: VLDataset) -> None:
    """Atomically write a dataset that `load_dataset` reads back with weights_only=True."""
    state = {"images": dataset.images, "samples": dataset.samples,
             "patch_labels": dataset.patch_labels, "meta": dataset.meta}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_dataset(path, image_size: Optional[int] = None) -> VLDataset:
    """Read a file written by `save_dataset`, checking its structure (one-line errors name the file).

    image_size: the side in pixels the caller's model expects, if it should be checked.
    """
    path = Path(path)
    state = load_plain(path, "dataset file")
    if not isinstance(state, dict) or not {"images", "samples"} <= set(state):
        raise DispError(f"{path} is not a disp dataset file (needs 'images' and 'samples')")
    images, samples = state["images"], state["samples"]
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise DispError(f"{path}: images must be a uint8 tensor (N, 3, H, W); rerun the stage that writes it")
    if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
        raise DispError(f"{path} holds {images.shape[3]}x{images.shape[2]} px images, but the model expects "
                        f"{image_size}x{image_size}: it comes from another run; use the files of one run directory")
    if not isinstance(samples, list):
        raise DispError(f"{path}: samples must be a list; rerun the stage that writes it")
    for i, sample in enumerate(samples):
        missing = [k for k in ("image", "task", "prompt", "response") if not isinstance(sample, dict) or k not in sample]
        if missing:
            raise DispError(f"{path}: sample {i} has no '{missing[0]}' key; rerun the stage that writes it")
        if not isinstance(sample["image"], int) or not 0 <= sample["image"] < len(images):
            raise DispError(f"{path}: sample {i} points at image {sample['image']!r}, but the file holds "
                            f"{len(images)} images; rerun the stage that writes it")
    if not samples:
        raise DispError(f"{path} holds no samples; rerun the stage that writes it")
    return VLDataset(images, samples, state.get("patch_labels"), state.get("meta") or {})
