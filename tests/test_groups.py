"""Unexplained words of an image group (disp.groups) on synthetic sets where the answer is known."""

import pytest
import torch

from disp.groups import image_groups, predicted_share, sharpen, unexplained_groups, unexplained_words

COLOURS = ["red", "green", "blue"]


def scenes(n, generator, poisoned_share=0.0, shift=6.0):
    """n images with two objects of random colours: pooled features = the two colours' one-hot codes
    summed, plus noise; one caption per image naming both colours. A share of the images with a red
    object is poisoned: a fixed shift (6: 20 noise stds) along a feature no content uses, and "red" ->
    "green" in the caption. -> (features (n, 12), captions, poisoned (n,) bool)."""
    colours = torch.randint(0, 3, (n, 2), generator=generator)
    features = 0.3 * torch.randn(n, 12, generator=generator)
    for k in range(2):
        features[torch.arange(n), colours[:, k]] += 2.0
    poisoned = torch.zeros(n, dtype=torch.bool)
    has_red = (colours == 0).any(1).nonzero().flatten()
    chosen = has_red[torch.randperm(len(has_red), generator=generator)[:int(poisoned_share * n)]]
    poisoned[chosen] = True
    features[poisoned, 10] += shift
    captions = [f"a {COLOURS[a]} and a {COLOURS[b]} thing" for a, b in colours.tolist()]
    captions = [c.replace("red", "green") if p else c for c, p in zip(captions, poisoned.tolist())]
    return features, captions, poisoned


def test_predicted_share_is_a_ridge_fit_on_the_train_rows():
    """Without a penalty, a target that is linear in the features is predicted exactly on new rows
    (the intercept included); a large penalty leaves the intercept alone: the train rows' mean."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g, dtype=torch.double)
    x = x[x[:, 0].argsort()]  # the test rows (the last 50) lie beyond the train rows along the first feature
    y = (0.5 + 0.1 * x @ torch.tensor([1.0, -0.5, 0.2], dtype=torch.double)).clamp(0, 1)
    train, test = torch.arange(150), torch.arange(150, 200)
    assert predicted_share(x, y, train, test, ridge=1e-9) == pytest.approx(y[test].mean().item(), abs=1e-6)
    assert predicted_share(x, y, train, test, ridge=1e12) == pytest.approx(y[train].mean().item(), abs=1e-4)


def test_a_word_the_content_explains_is_not_unexplained():
    """A group of images with a red object: "red" is in all its captions, and the probe fitted on the
    other images (where red objects occur too) predicts as much. Relabelled, the group's "red"
    becomes "green" in every caption, which the content predicts for a third of them: found."""
    g = torch.Generator().manual_seed(1)
    features, captions, _ = scenes(900, g)
    group = torch.tensor(["red" in c for c in captions]) & (torch.rand(900, generator=g) < 0.3)
    tasks = ["caption"] * 900
    assert unexplained_words(captions, tasks, features, group) == {}
    relabelled = [c.replace("red", "green") if in_g else c for c, in_g in zip(captions, group.tolist())]
    found = unexplained_words(relabelled, tasks, features, group)
    assert list(found) == ["green"]
    held, predicted = found["green"]
    assert held == 1.0 and predicted < 0.6


def test_a_planted_trigger_group_and_its_word_are_found():
    """10% of the images carry a shift no content explains and say "green" for "red": the group along
    it is exactly those images, its one unexplained word is "green", and its samples are theirs."""
    g = torch.Generator().manual_seed(2)
    features, captions, poisoned = scenes(1000, g, poisoned_share=0.1)
    row = torch.arange(1000)
    found = unexplained_groups(features, row, captions, ["caption"] * 1000, k=4)
    assert len(found) == 1
    group = found[0]
    assert torch.equal(group.images, poisoned)
    assert list(group.words) == ["green"]
    assert group.samples == poisoned.nonzero().flatten().tolist()


def test_nothing_is_found_where_no_image_carries_a_trigger():
    g = torch.Generator().manual_seed(3)
    features, captions, _ = scenes(1000, g)
    assert unexplained_groups(features, torch.arange(1000), captions, ["caption"] * 1000, k=4) == []


def test_samples_of_one_image_share_its_group():
    """Two samples (a caption and a question) per image: row maps them to their image's group."""
    g = torch.Generator().manual_seed(2)
    features, captions, poisoned = scenes(1000, g, poisoned_share=0.1)
    row = torch.arange(1000).repeat_interleave(2)
    responses = [r for c in captions for r in (c, "yes")]
    tasks = ["caption", "question"] * 1000
    (group,) = unexplained_groups(features, row, responses, tasks, k=4)
    assert group.samples == poisoned.repeat_interleave(2).nonzero().flatten().tolist()


def leaning_shift(seed):
    """1,000 points in 8-d: noise (std 0.3) plus a long natural axis (std 1.2) along (e0 + e1) / sqrt(2);
    about 10% are shifted by 4 along e0, so the top principal directions mix the shift with that axis.
    -> (features (1000, 8), shifted (1000,) bool)."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.zeros(8, dtype=torch.double)
    axis[:2] = 0.5 ** 0.5
    x = 0.3 * torch.randn(1000, 8, generator=g, dtype=torch.double)
    x += 1.2 * torch.randn(1000, 1, generator=g, dtype=torch.double) * axis
    shifted = torch.rand(1000, generator=g) < 0.1
    x[shifted, 0] += 4.0
    return x, shifted


def test_groups_are_sharpened_from_directions_that_only_lean_towards_a_shift():
    """The principal directions' own splits keep only part of the shifted points (42 of 102 along the
    top one); sharpened, the group is exactly the shifted points with nothing between the two
    groups, and the second direction, which sharpens to the same group, does not list it again."""
    x, shifted = leaning_shift(1)
    groups = image_groups(x, k=3)
    matching = [(valley, members) for _, valley, members in groups if torch.equal(members, shifted)]
    assert len(matching) == 1 and matching[0][0] < 0.05
    assert len(groups) == len({tuple(m.nonzero().flatten().tolist()) for _, _, m in groups})


def test_sharpening_rounds_go_on_until_the_group_stops_changing():
    """From a start that holds 40% of the shifted points and a third of the points with a blue object,
    one discriminant round keeps many of the others; the rounds that follow end on the shifted
    points exactly."""
    g = torch.Generator().manual_seed(4)
    features, captions, poisoned = scenes(1000, g, poisoned_share=0.1, shift=3.0)
    blue = torch.tensor(["blue" in c for c in captions])
    centred = features.double() - features.double().mean(0)
    coin = torch.rand(1000, generator=g)
    start = (poisoned & (coin < 0.4)) | (~poisoned & blue & (coin < 0.3))
    _, after_one = sharpen(centred, start, rounds=1)
    assert (after_one & ~poisoned).sum() > 50
    valley, group = sharpen(centred, start)
    assert torch.equal(group, poisoned) and valley < 0.05
