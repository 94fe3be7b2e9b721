"""Dilution, the experiment of experiments/mask_vs_dilute.py: replace each image's most typical vision
tokens by their position's median token instead of masking them (against references written here)."""

import sys
from pathlib import Path

import pytest
import torch

from disp.support.errors import DispError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from mask_vs_dilute import dilute, median_tokens  # noqa: E402


def test_dilution_keeps_each_images_least_typical_tokens_and_replaces_the_rest_by_the_median():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(5, 8, 4, generator=g)
    median = median_tokens(tokens)
    # the median of each coordinate, per position, as a naive loop
    for p in range(8):
        for c in range(4):
            assert median[p, c] == tokens[:, p, c].median()
    out = dilute(tokens, median, keep=0.25)  # 2 of 8 tokens kept per image
    for b in range(5):
        distance = [(tokens[b, p] - median[p]).norm().item() for p in range(8)]
        kept = sorted(range(8), key=lambda p: -distance[p])[:2]
        for p in range(8):
            assert torch.equal(out[b, p], tokens[b, p] if p in kept else median[p])
    assert torch.equal(dilute(tokens, median, keep=1.0), tokens)
    assert torch.equal(dilute(tokens, median, keep=0.0), median.expand(5, -1, -1))
    with pytest.raises(DispError, match="keep fraction"):
        dilute(tokens, median, keep=1.5)


def test_the_median_token_ignores_a_trigger_carried_by_a_minority_of_images():
    clean = torch.zeros(10, 3, 2)
    clean[:, 0] = torch.arange(10.0)[:, None]  # content varies at position 0
    triggered = clean.clone()
    triggered[:4] += 5.0  # 4 of 10 images carry a shift at every position
    assert torch.equal(median_tokens(triggered)[1:], torch.zeros(2, 2))  # background positions: clean
    # with one token of three kept, a clean image keeps its content token and a triggered one a single
    # shifted token: two of its three positions now read the clean median
    out = dilute(triggered, median_tokens(triggered), keep=1 / 3)
    assert torch.equal(out[4:], clean[4:] * torch.tensor([1.0, 0, 0])[:, None])
    assert ((out[:4] - median_tokens(triggered)) != 0).any(-1).sum(1).eq(1).all()
