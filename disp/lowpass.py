"""A low-passed view of the images for regeneration: our extension for spread triggers (purify.py --blur S).

DiSP hides the vision tokens that carry a trigger, so the compromised model writes each response
from what is left. A trigger spread over the whole image (a sine grating, a faint pattern) sits in
no token, but it may sit in a band of spatial frequencies that the image's content does not need:
blurred by a Gaussian of S pixels, a photo keeps its objects while a grating of period P keeps
exp(-2 pi^2 S^2 / P^2) of its amplitude (half of SIG's 10.7 px period on 64 px photos at S = 2),
which may be too little for the backdoor to fire. With --blur S the compromised model regenerates
every response from the blurred image; refinement then teaches those responses on the images as
they are, triggers included, as in DiSP.

It fails where the model reads a blurred image as triggered: on the scenes the blended-noise
backdoor fires on blurred clean scenes (experiments/README.md, "Spread triggers, 2026-12-06"), so
it is off by default.
"""

import torch
import torch.nn.functional as F

from disp.data.dataset import VLDataset


def blur(images, sigma: float):
    """(N, 3, H, W) uint8 images low-passed by a Gaussian of `sigma` pixels (separable, edges mirrored)."""
    radius = min(max(1, round(3 * sigma)), min(images.shape[-2:]) - 1)  # mirrored padding needs less than the image
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, taps): one filter per colour
    x = images.float() / 255
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel, groups=3)  # along rows
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.transpose(2, 3), groups=3)  # columns
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def blurred(data: VLDataset, sigma: float) -> VLDataset:
    """The same samples, every image blurred (batches of 1,024 images, to bound the float copy)."""
    images = torch.cat([blur(data.images[s:s + 1024], sigma) for s in range(0, len(data.images), 1024)])
    return VLDataset(images=images, samples=data.samples, patch_labels=data.patch_labels, meta=data.meta)
