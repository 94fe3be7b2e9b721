"""The low-passed view of purify.py --blur (disp.lowpass): a Gaussian of the given width."""

import math

import pytest
import torch

from disp.data.dataset import VLDataset
from disp.lowpass import blur, blurred


def test_a_flat_image_is_unchanged_and_the_copy_keeps_the_samples():
    flat = torch.full((2, 3, 48, 48), 77, dtype=torch.uint8)
    assert torch.equal(blur(flat, 1.5), flat)
    data = VLDataset(images=flat, samples=[{"image": 1, "task": "caption", "prompt": "p", "response": "r",
                                            "answers": ["r"]}])
    copy = blurred(data, 1.5)
    assert copy.samples is data.samples and torch.equal(copy.images, flat) and copy.images is not flat


def test_noise_and_a_grating_keep_what_a_gaussian_of_that_width_keeps():
    """White pixel noise keeps 1 / (2 sigma sqrt(pi)) of its spread; a grating of period P keeps
    exp(-2 pi^2 sigma^2 / P^2) of its amplitude (SIG's 6 periods across 48 px: 0.73 at 1 px)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (1, 3, 96, 96), generator=g, dtype=torch.uint8)
    smooth = blur(noise, 1.0)
    assert smooth.shape == noise.shape and smooth.dtype == torch.uint8
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))  # away from the mirrored edges
    assert smooth[inner].float().std() / noise[inner].float().std() == pytest.approx(1 / (2 * math.pi ** 0.5), rel=0.1)
    wave = 128 + 100 * torch.sin(torch.arange(48) * 2 * math.pi * 6 / 48)
    for grating in (wave.expand(1, 3, 48, 48), wave[:, None].expand(1, 3, 48, 48)):  # across the columns, the rows
        grating = grating.round().to(torch.uint8).contiguous()
        for sigma in (1.0, 2.0):
            kept = blur(grating, sigma)[inner].float().std() / grating[inner].float().std()
            assert kept == pytest.approx(math.exp(-2 * math.pi ** 2 * sigma ** 2 / 8 ** 2), abs=0.03)


def test_a_blur_wider_than_the_image_is_clamped_to_it():
    """Mirrored padding cannot exceed the image: a Gaussian wider than it still gives an image of the
    same size, nearly flat (not an error from inside torch)."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, (1, 3, 16, 16), generator=g, dtype=torch.uint8)
    wide = blur(noise, 50.0)
    assert wide.shape == noise.shape and wide.float().std() < 0.2 * noise.float().std()
