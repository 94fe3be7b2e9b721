"""Feature-space purification (disp.spectral) on synthetic vision tokens where the answer is known."""

import importlib.util
from pathlib import Path

import pytest
import torch

from disp import spectral
from disp.saliency import first_step_logits
from disp.spectral import find_directions, project_out, top_directions
from tests.conftest import inputs, small_model


def clean_tokens(n, generator, n_vision=16, dim=8):
    """Images whose tokens vary along a few strong axes (as photos do: brightness, colour) plus noise."""
    axes = torch.linalg.qr(torch.randn(n_vision * dim, 4, generator=generator)).Q.T  # 4 orthonormal axes
    coef = torch.randn(n, 4, generator=generator) * torch.tensor([3.0, 2.0, 1.5, 1.0])
    return (coef @ axes + 0.5 * torch.randn(n, n_vision * dim, generator=generator)).view(n, n_vision, dim)


def test_top_directions_match_a_full_svd():
    g = torch.Generator().manual_seed(0)
    x = clean_tokens(300, g).flatten(1).double()
    x = x - x.mean(0)
    vectors, values = top_directions(x, 3)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    assert torch.allclose(values, s[:3], rtol=1e-6)
    assert torch.allclose((vectors.T @ vh[:3].T).abs(), torch.eye(3, dtype=torch.double), atol=1e-6)  # up to sign


@pytest.mark.parametrize("flip", [False, True])
def test_a_planted_shift_in_a_minority_is_found_and_projected_out(flip, monkeypatch):
    """15% of the images share one shift spread over every token (variance 12.75 along it, against
    9, 4, 2.25 and 1 along the clean axes): it is the one direction of the top 3 that splits them, its
    group is exactly the shifted images, and afterwards every image has the clean group's component
    along it, the rest untouched. A singular vector's sign is arbitrary: with it flipped (flip), the
    direction is still oriented towards the smaller group."""
    if flip:
        real = spectral.top_directions
        monkeypatch.setattr(spectral, "top_directions",
                            lambda x, k, seed: tuple(t * s for t, s in zip(real(x, k, seed=seed), (-1, 1))))
    g = torch.Generator().manual_seed(0)
    tokens = clean_tokens(2000, g)
    shift = torch.randn(16 * 8, generator=g)
    shift = 10 * shift / shift.norm()
    poisoned = torch.zeros(2000, dtype=torch.bool)
    poisoned[torch.randperm(2000, generator=g)[:300]] = True
    tokens[poisoned] += shift.view(16, 8)
    found = find_directions(tokens, k=3)
    assert len(found) == 1
    d = found[0]
    assert torch.equal(d.flagged, poisoned)
    assert (d.vector @ shift / shift.norm()).item() > 0.9  # oriented: the shifted group lies above
    moved = project_out(tokens, found)
    along = moved.flatten(1) @ d.vector
    assert torch.allclose(along, torch.full_like(along, d.centre), atol=1e-4)  # all at the clean group's value
    rest = torch.eye(16 * 8) - torch.outer(d.vector, d.vector)  # the orthogonal complement is untouched
    assert torch.allclose(moved.flatten(1) @ rest, tokens.flatten(1) @ rest, atol=1e-4)
    assert moved.shape == tokens.shape and moved.dtype == tokens.dtype


def test_nothing_is_found_where_nothing_was_planted():
    g = torch.Generator().manual_seed(1)
    assert find_directions(clean_tokens(2000, g), k=3) == []
    assert find_directions(torch.randn(2000, 16, 8, generator=g), k=3) == []
    assert find_directions(clean_tokens(30, g), k=3) == []  # too few images to see two groups


def load_feature_shift():
    """experiments/feature_shift.py, the measurement that shows where a spread trigger's shift lies."""
    path = Path(__file__).resolve().parents[1] / "experiments" / "feature_shift.py"
    spec = importlib.util.spec_from_file_location("feature_shift", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_roc_auc_counts_pairs_and_half_ties():
    fs = load_feature_shift()
    labels = torch.tensor([False, False, True, True])
    assert fs.roc_auc(torch.tensor([1.0, 2.0, 3.0, 4.0]), labels) == 1.0
    assert fs.roc_auc(torch.tensor([3.0, 4.0, 1.0, 2.0]), labels) == 0.0
    assert fs.roc_auc(torch.tensor([1.0, 3.0, 2.0, 3.0]), labels) == pytest.approx((1 + 0.5 + 1 + 0) / 4)


def test_feature_shift_reports_a_planted_shift_that_overlaps_the_clean_images():
    """40% of the images moved 2 clean SDs along one axis (as SIG moves Flickr8k photos): the oracle
    direction finds them (AUC ~0.92 for a 2-SD Gaussian shift, separation ~2) and the top principal
    direction carries them, but the two groups overlap: no valley the spectral rule (<= 0.25) would take."""
    fs = load_feature_shift()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 30, generator=g, dtype=torch.double)
    triggered = torch.rand(2000, generator=g) < 0.4
    x[triggered, 0] += 2.0
    rows = fs.describe(x, triggered, 3)
    oracle = rows[-1]
    assert oracle["direction"] == "oracle" and oracle["separation"] == pytest.approx(2.0, abs=0.15)
    assert 0.88 < oracle["auc"] < 0.96 and oracle["valley"] > 0.25
    top = rows[0]
    assert max(top["auc"], 1 - top["auc"]) > 0.85 and top["variance_share"] > 0.05
    assert sum(r["variance_share"] for r in rows[:3]) < 1


def test_response_states_are_what_the_head_reads_at_the_first_step():
    """feature_shift.py's "response" form: the normalised last-layer states at the response positions
    with the whole response [MASK], averaged over them. The head is affine, so it maps their average to
    the average of the first step's logits over the response positions."""
    fs = load_feature_shift()
    model = small_model()
    images, prompts = inputs(batch=5)
    with torch.no_grad():
        tokens = model.encode_images(images)
        states = fs.response_states(model, tokens, prompts, batch_size=2)  # batches of 2: the split must not matter
        logits = first_step_logits(model, tokens, prompts)
        assert states.shape == (5, model.cfg.dim)
        assert torch.allclose(model.lm_head(states), logits.mean(1), atol=1e-5)

