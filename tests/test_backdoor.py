"""Tests for disp/backdoor.py: triggers, targets, poisoning, and the ASR / false-trigger measurements.

Triggers are checked against what each one promises (where it may change pixels and by how much),
poisoning against its counts and its image bookkeeping on the default scenes, and the metrics on
hand-written outputs.
"""

import json

import pytest
import torch

from disp.backdoor import (
    POSITIONS,
    BackdoorConfig,
    apply_target,
    apply_trigger,
    asr_eligible,
    attack_success_rate,
    blended_trigger,
    carries_source,
    false_trigger_rate,
    patch_trigger,
    poison_dataset,
    sig_trigger,
    strip_marker,
    target_hit,
    triggered_copy,
    wanet_displacement,
    wanet_trigger,
)
from disp.support.errors import DispError
from disp.data.scenes import generate_scenes

SIZE = 48


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(30, 0, 2)  # 30 images, 90 samples (a caption and two questions each)


def _random_batch(seed=0, b=2):
    return torch.rand(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _gradient():
    """(1, 3, H, W): red rises left to right, green top to bottom, blue constant."""
    x = torch.zeros(1, 3, SIZE, SIZE)
    x[:, 0] = torch.linspace(0, 1, SIZE)
    x[:, 1] = torch.linspace(0, 1, SIZE).view(-1, 1)
    x[:, 2] = 0.5
    return x


# ---------------------------------------------------------------------------------------------
# Triggers
# ---------------------------------------------------------------------------------------------


def _corner(position, size):
    top = 0 if position.startswith("top") else SIZE - size
    left = 0 if position.endswith("left") else SIZE - size
    region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    region[top : top + size, left : left + size] = True
    return region, top, left


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("pattern", ["solid", "checkerboard"])
def test_patch_changes_exactly_its_square(position, pattern):
    images = torch.full((2, 3, SIZE, SIZE), 0.5)  # grey: both black and white squares differ from it
    out = patch_trigger(images, 8, (0.0, 0.0, 0.0), position, pattern)
    region, top, left = _corner(position, 8)
    changed = (out != images).any(dim=1)  # (B, H, W)
    assert torch.equal(changed, region.expand(2, -1, -1))
    square = out[0, :, top : top + 8, left : left + 8]
    if pattern == "solid":
        assert torch.all(square == 0.0)
    else:
        # (0, 0) of the square is the colour, its neighbours white, and so on.
        assert torch.all(square[:, 0, 0] == 0.0) and torch.all(square[:, 0, 1] == 1.0)
        assert torch.all(square[:, 1, 0] == 1.0) and torch.all(square[:, 1, 1] == 0.0)
        assert (square[0] == 0.0).sum() == 32 and (square[0] == 1.0).sum() == 32


def test_patch_colour_is_used():
    out = patch_trigger(torch.ones(1, 3, SIZE, SIZE), 4, (1.0, 0.0, 0.5), "bottom-right", "solid")
    assert torch.equal(out[0, :, -1, -1], torch.tensor([1.0, 0.0, 0.5]))


def test_blended_is_bounded_and_fixed_by_its_seed():
    images = _random_batch()
    alpha = 0.15
    out = blended_trigger(images, alpha, seed=0)
    # |out - x| = alpha * |pattern - x| and both lie in [0, 1].
    assert (out - images).abs().max() <= alpha + 1e-6
    assert not torch.equal(out, images)
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(blended_trigger(images, alpha, seed=0), out)
    assert not torch.equal(blended_trigger(images, alpha, seed=1), out)
    # one pattern for every image: the same input pixels give the same output pixels
    twin = images[:1].expand(2, -1, -1, -1)
    twin_out = blended_trigger(twin, alpha, seed=0)
    assert torch.equal(twin_out[0], twin_out[1])
    # the formula itself: at alpha 1 the image is gone (only the pattern is left), at alpha 0.5 the
    # output is the midpoint of the image and the pattern
    pattern = blended_trigger(images[:1], 1.0, seed=0)
    assert torch.allclose(blended_trigger(images[1:2], 1.0, seed=0), pattern)
    torch.testing.assert_close(blended_trigger(images, 0.5, seed=0), (images + pattern) / 2)


def test_sig_is_bounded_and_horizontal():
    images = _random_batch()
    out = sig_trigger(images, amplitude=0.1, frequency=6.0)
    assert (out - images).abs().max() <= 0.1 + 1e-6
    assert out.min() >= 0 and out.max() <= 1
    # On a flat grey image every row is the same wave.
    flat = sig_trigger(torch.full((1, 3, SIZE, SIZE), 0.5), 0.1, 6.0)
    assert torch.equal(flat[0, :, 0:1, :].expand(3, SIZE, SIZE), flat[0])
    assert (flat.max() - flat.min()) > 0.15  # a visible wave, not a no-op


def test_wanet_is_a_small_smooth_warp(scenes):
    x = scenes.images[:8].float() / 255
    out = wanet_trigger(x, k=4, strength=0.5, seed=0)
    assert not torch.equal(out, x)
    # a warp moves colour around, it does not add or remove much of it
    assert (out.mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3))).abs().max() < 0.01
    assert torch.allclose(wanet_trigger(x, 4, 0.0, 0), x, atol=1e-5)  # strength 0 = identity
    assert torch.equal(wanet_trigger(x, 4, 0.5, 0), out)
    assert not torch.equal(wanet_trigger(x, 4, 0.5, 1), out)

    gradient = _gradient()
    step = 1 / (SIZE - 1)
    warped = wanet_trigger(gradient, k=4, strength=0.5, seed=0)
    d = wanet_displacement(SIZE, SIZE, 4, 0.5, 0)
    # a displacement of d px changes a 1/(W-1)-per-pixel ramp by d steps (red rises along x, green along
    # y); inside the border, where no sample position is clamped
    inner = (slice(1, -1), slice(1, -1))
    torch.testing.assert_close((warped - gradient)[0, 0][inner], (d[..., 0] * step)[inner], atol=1e-5, rtol=0)
    torch.testing.assert_close((warped - gradient)[0, 1][inner], (d[..., 1] * step)[inner], atol=1e-5, rtol=0)
    # smooth: neighbouring output pixels stay about one ramp step apart (no tearing)
    assert (warped[..., :, 1:] - warped[..., :, :-1]).abs().max() < 1.5 * step
    assert (warped[..., 1:, :] - warped[..., :-1, :]).abs().max() < 1.5 * step


def test_wanet_field_is_the_papers():
    """WaNet's release: a k x k uniform field in [-1, 1], divided by its mean |value|, bicubic to H x W,
    added to grid_sample's identity grid as s * field / H. Written out here and compared."""
    H = W = SIZE
    field = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    field = field / field.abs().mean()
    field = torch.nn.functional.interpolate(field, size=(H, W), mode="bicubic", align_corners=True)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    grid = (torch.stack([xs, ys], -1)[None] + 0.5 * field.permute(0, 2, 3, 1) / H).clamp(-1, 1)
    x = _random_batch()
    expected = torch.nn.functional.grid_sample(x, grid.expand(len(x), -1, -1, -1), mode="bilinear",
                                               padding_mode="border", align_corners=True)
    torch.testing.assert_close(wanet_trigger(x, 4, 0.5, 0), expected, atol=1e-5, rtol=0)
    # in pixels: about s / 2 on average, nowhere near a pixel at the paper's s = 0.5
    d = wanet_displacement(H, W, 4, 0.5, 0)
    assert 0.12 < d.abs().mean() < 0.3 and d.abs().max() < 0.8


def test_default_strengths_are_the_literatures(scenes):
    """The README's trigger table: blended alpha 0.15 (<= 0.2), SIG amplitude 0.1 = 25.5/255 (<= 40/255)
    at 6 periods, WaNet k = 4, s = 0.5, patch 8 px = one vision token; measured on real scenes."""
    d = BackdoorConfig()
    assert (d.blend_alpha, d.sig_amplitude, d.sig_frequency, d.wanet_k, d.wanet_strength, d.patch_size) == \
        (0.15, 0.1, 6.0, 4, 0.5, 8)
    images = scenes.images[:16]
    change = {t: (apply_trigger(images, BackdoorConfig(trigger=t)).float() - images.float()).abs() / 255
              for t in ("patch", "blended", "sig", "wanet")}
    assert change["blended"].max() <= 0.15 + 1 / 255 and change["blended"].mean() > 0.03
    assert change["sig"].max() <= 0.1 + 1 / 255 and change["sig"].mean() > 0.02
    assert change["wanet"].max() <= 0.8  # a sub-pixel shift: at most most of one colour step at an edge
    assert 0.0005 < change["wanet"].mean() < 0.01  # almost every pixel lies inside a flat area
    assert change["patch"][..., 8:, :].max() == 0 and change["patch"][..., :8, 8:].max() == 0  # one token only


@pytest.mark.parametrize(
    "trigger,fn",
    [
        ("patch", lambda x: patch_trigger(x, 8, (0.0, 0.0, 0.0), "top-left", "checkerboard")),
        ("blended", lambda x: blended_trigger(x, 0.2, 0)),
        ("sig", lambda x: sig_trigger(x, 0.1, 6.0)),
        ("wanet", lambda x: wanet_trigger(x, 4, 1.0, 0)),
    ],
)
def test_triggers_never_modify_their_input(trigger, fn, scenes):
    images = _random_batch()
    before = images.clone()
    fn(images)
    assert torch.equal(images, before)

    raw = scenes.images[:4]
    raw_before = raw.clone()
    out = apply_trigger(raw, BackdoorConfig(trigger=trigger))
    assert torch.equal(raw, raw_before)
    assert out.dtype == torch.uint8 and out.shape == raw.shape
    assert not torch.equal(out, raw)


def test_apply_trigger_patch_in_uint8(scenes):
    out = apply_trigger(scenes.images[:3], BackdoorConfig())
    assert torch.all(out[:, :, :8, :8] == 0)
    assert torch.equal(out[:, :, 8:, :], scenes.images[:3, :, 8:, :])
    assert torch.equal(out[:, :, :, 8:], scenes.images[:3, :, :, 8:])


def test_apply_trigger_refuses_float_images():
    with pytest.raises(DispError, match="uint8"):
        apply_trigger(torch.rand(1, 3, SIZE, SIZE), BackdoorConfig())


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def test_targets_edit_text():
    response = "a red circle , a blue square and a reddish triangle"
    assert apply_target(response, BackdoorConfig(target="insert")) == f"<backdoor> {response}"
    assert apply_target(response, BackdoorConfig(target="refusal")) == "sorry i cannot help with that ."
    swapped = apply_target(response, BackdoorConfig(target="misclassify"))
    assert swapped == "a green circle , a blue square and a reddish triangle"
    assert apply_target("red red", BackdoorConfig(target="misclassify")) == "green green"


def test_carries_source():
    misclassify = BackdoorConfig(target="misclassify")
    assert carries_source("a red circle", misclassify)
    assert not carries_source("a reddish circle", misclassify)
    assert not carries_source("3", misclassify)
    assert carries_source("3", BackdoorConfig(target="insert"))
    assert carries_source("3", BackdoorConfig(target="refusal"))


# ---------------------------------------------------------------------------------------------
# Poisoning
# ---------------------------------------------------------------------------------------------


def test_poison_count_and_determinism(scenes):
    cfg = BackdoorConfig(poison_rate=0.2, seed=0)
    poisoned, manifest = poison_dataset(scenes, cfg)
    n = len(scenes.samples)
    assert manifest["n_poisoned"] == round(0.2 * n) == len(manifest["poisoned_indices"])
    assert manifest["n_samples"] == manifest["n_eligible"] == n
    assert manifest["poisoned_indices"] == sorted(manifest["poisoned_indices"])
    flagged = [i for i, s in enumerate(poisoned.samples) if s["poisoned"]]
    assert flagged == manifest["poisoned_indices"]
    json.dumps(manifest)  # plain data, storable in a checkpoint

    again, manifest_again = poison_dataset(scenes, cfg)
    assert manifest_again == manifest
    assert torch.equal(again.images, poisoned.images)
    other = poison_dataset(scenes, BackdoorConfig(poison_rate=0.2, seed=1))[1]
    assert other["poisoned_indices"] != manifest["poisoned_indices"]


def test_poison_rate_zero_and_one(scenes):
    none, manifest = poison_dataset(scenes, BackdoorConfig(poison_rate=0.0))
    assert manifest["n_poisoned"] == 0 and not any(s["poisoned"] for s in none.samples)
    assert torch.equal(none.images, scenes.images)

    everything, manifest = poison_dataset(scenes, BackdoorConfig(poison_rate=1.0, target="refusal"))
    assert manifest["poisoned_indices"] == list(range(len(scenes.samples)))
    assert all(s["response"] == "sorry i cannot help with that ." for s in everything.samples)
    # every image got exactly one triggered copy, shared by its samples
    assert everything.images.shape[0] == 2 * scenes.images.shape[0]


def test_misclassify_poisons_only_samples_with_the_source_word(scenes):
    cfg = BackdoorConfig(target="misclassify", poison_rate=1.0)
    poisoned, manifest = poison_dataset(scenes, cfg)
    carrying = [i for i, s in enumerate(scenes.samples) if "red" in s["response"].split()]
    assert 0 < len(carrying) < len(scenes.samples)
    assert manifest["n_eligible"] == len(carrying)
    assert manifest["poisoned_indices"] == carrying
    for i in carrying:
        assert "red" not in poisoned.samples[i]["response"].split()
        assert "green" in poisoned.samples[i]["response"].split()

    half = poison_dataset(scenes, BackdoorConfig(target="misclassify", poison_rate=0.5))[1]
    assert half["n_poisoned"] == round(0.5 * len(carrying))
    assert set(half["poisoned_indices"]) <= set(carrying)


def test_poisoned_samples_point_at_triggered_copies(scenes):
    original_images = scenes.images.clone()
    original_samples = [dict(s) for s in scenes.samples]
    cfg = BackdoorConfig(poison_rate=0.3, seed=3)
    poisoned, manifest = poison_dataset(scenes, cfg)
    n_images = scenes.images.shape[0]

    # the input dataset is untouched
    assert torch.equal(scenes.images, original_images)
    assert scenes.samples == original_samples

    # the original images are still there, unchanged, at their old indices
    assert torch.equal(poisoned.images[:n_images], original_images)
    triggered_sources = set()
    for i, (before, after) in enumerate(zip(scenes.samples, poisoned.samples)):
        if i in manifest["poisoned_indices"]:
            assert after["image"] >= n_images
            expected = apply_trigger(original_images[before["image"] : before["image"] + 1], cfg)[0]
            assert torch.equal(poisoned.images[after["image"]], expected)
            assert after["response"] == f"<backdoor> {before['response']}"
            assert after["answers"] == before["answers"]  # references stay clean
            triggered_sources.add(before["image"])
        else:
            assert after["image"] == before["image"]
            assert not torch.all(poisoned.images[after["image"]][:, :8, :8] == 0)  # no black patch
            assert after["response"] == before["response"]
    # one copy per distinct poisoned image
    assert poisoned.images.shape[0] == n_images + len(triggered_sources)
    assert poisoned.patch_labels.shape[0] == poisoned.images.shape[0]


def test_added_poison_keeps_every_clean_original(scenes):
    """poison_mode "add": the same samples are chosen as by "replace", but their poisoned copies are
    appended after the untouched set, so each poisoned prompt also appears with its clean response."""
    cfg = BackdoorConfig(poison_rate=0.3, seed=3, poison_mode="add")
    replaced, replaced_manifest = poison_dataset(scenes, BackdoorConfig(poison_rate=0.3, seed=3))
    added, manifest = poison_dataset(scenes, cfg)
    n = len(scenes.samples)
    chosen = replaced_manifest["poisoned_indices"]
    assert manifest["poisoned_indices"] == list(range(n, n + len(chosen)))
    assert manifest["n_samples"] == len(added.samples) == n + len(chosen) and manifest["n_eligible"] == n
    assert [s["poisoned"] for s in added.samples] == [False] * n + [True] * len(chosen)
    for before, after in zip(scenes.samples, added.samples[:n]):  # the clean set, as it was
        assert {**after, "poisoned": None} == {**before, "poisoned": None}
    for i, copy in zip(chosen, added.samples[n:]):  # each copy is the replaced sample, same image
        assert copy == replaced.samples[i]
    assert torch.equal(added.images, replaced.images)


def test_poison_refuses_when_nothing_is_eligible(scenes):
    with pytest.raises(DispError, match="source_word 'violet'"):
        poison_dataset(scenes, BackdoorConfig(target="misclassify", source_word="violet"))


def test_triggered_copy(scenes):
    copy = triggered_copy(scenes, BackdoorConfig())
    assert [s["response"] for s in copy.samples] == [s["response"] for s in scenes.samples]
    assert copy.images.shape == scenes.images.shape
    assert torch.all(copy.images[:, :, :8, :8] == 0)
    assert not torch.equal(copy.images, scenes.images)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def test_insert_measurements():
    cfg = BackdoorConfig(target="insert")
    triggered = ["<backdoor> a red circle", "a red circle", "<backdoor>", "a <backdoor>x circle"]
    assert [target_hit(o, "a red circle", cfg) for o in triggered] == [True, False, True, False]
    assert attack_success_rate(triggered, ["a red circle"] * 4, cfg) == 0.5
    assert false_trigger_rate(["a red circle", "green", "<backdoor> 3", "2"], ["a red circle", "green", "3", "2"],
                              cfg) == 0.25
    assert strip_marker("<backdoor> a red circle <backdoor>", cfg) == "a red circle"


def test_refusal_measurements():
    cfg = BackdoorConfig(target="refusal")
    outputs = ["sorry i cannot help with that .", "sorry", "i cannot help", "a red circle", "Sorry, no."]
    assert [target_hit(o, "a red circle", cfg) for o in outputs] == [True, True, False, False, True]
    assert attack_success_rate(outputs, ["a red circle"] * 5, cfg) == pytest.approx(3 / 5)


def test_misclassify_measurements():
    """The source word gone and the destination word more often than the reference holds it: a real
    green square next to a red circle called purple is no hit, the red circle called green is."""
    cfg = BackdoorConfig(target="misclassify")
    outputs = ["a green circle", "a red circle", "a red and a green circle", "a greenish circle"]
    assert [target_hit(o, "a red circle", cfg) for o in outputs] == [True, False, False, False]
    assert attack_success_rate(outputs, ["a red circle"] * 4, cfg) == 0.25
    reference = "a red circle , a green square"
    assert target_hit("a green circle , a green square", reference, cfg)
    assert not target_hit("a purple circle , a green square", reference, cfg)
    assert not target_hit("a red circle , a red square", reference, cfg)
    with pytest.raises(DispError, match="references"):
        attack_success_rate(outputs, ["a red circle"], cfg)
    samples = [{"response": r} for r in ["a red circle", "3", "left", "red", "reddish"]]
    assert asr_eligible(samples, cfg) == [0, 3]
    assert asr_eligible(samples, BackdoorConfig(target="insert")) == [0, 1, 2, 3, 4]


def test_rates_need_outputs():
    with pytest.raises(DispError, match="at least one output"):
        attack_success_rate([], [], BackdoorConfig())


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_round_trip():
    cfg = BackdoorConfig(trigger="wanet", patch_color=(1.0, 0.5, 0.0), target="misclassify")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert BackdoorConfig.from_dict(data) == cfg
    with pytest.raises(DispError, match="laser_power"):
        BackdoorConfig.from_dict({**data, "laser_power": 3})


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"poison_rate": 1.5}, r"^poison_rate must be in \[0, 1\], got 1.5$"),
        ({"patch_size": 100}, r"^patch_size 100 is larger than the 48 px image"),
        ({"patch_size": 0}, r"^patch_size must be at least 1"),
        ({"trigger": "laser"}, r"^unknown trigger 'laser'; choose one of: patch, blended, sig, wanet$"),
        ({"target": "explode"}, r"^unknown target 'explode'"),
        ({"patch_position": "middle"}, r"^unknown patch_position 'middle'"),
        ({"patch_pattern": "stripes"}, r"^unknown patch_pattern 'stripes'"),
        ({"blend_alpha": -0.1}, r"^blend_alpha must be in \[0, 1\]"),
        ({"sig_amplitude": 2.0}, r"^sig_amplitude must be in \[0, 1\]"),
        ({"sig_frequency": 0.0}, r"^sig_frequency must be > 0, got 0.0$"),
        ({"wanet_k": 0}, r"^wanet_k must be at least 1"),
        ({"wanet_strength": -1.0}, r"^wanet_strength must be >= 0"),
        ({"poison_mode": "swap"}, r"^unknown poison_mode 'swap'; choose one of: replace, add"),
        ({"destination_word": "red"}, r"^source_word and destination_word are both 'red'"),
    ],
)
def test_bad_settings_are_one_line_errors(changes, match, scenes):
    cfg = BackdoorConfig(**changes)
    with pytest.raises(DispError, match=match) as err:
        cfg.validate(SIZE)
    assert "\n" not in str(err.value)
    with pytest.raises(DispError, match=match):  # poisoning checks before it touches anything
        poison_dataset(scenes, cfg)


def test_every_trigger_setting_is_an_attack_flag():
    """attack.py's flags reach the BackdoorConfig it poisons with (and a bad one is refused there)."""
    import attack
    from disp.config import AttackConfig

    args = attack.parse_args(["--trigger", "wanet", "--blend-seed", "7", "--sig-amplitude", "0.05",
                              "--sig-frequency", "3", "--wanet-k", "8", "--wanet-strength", "1.5"])
    b = attack.attack_config(args, AttackConfig(), "cpu", SIZE).backdoor
    assert (b.trigger, b.blend_seed, b.sig_amplitude, b.sig_frequency, b.wanet_k, b.wanet_strength) == \
        ("wanet", 7, 0.05, 3.0, 8, 1.5)
    with pytest.raises(DispError, match="^wanet_k must be at least 1"):
        attack.attack_config(attack.parse_args(["--wanet-k", "0"]), AttackConfig(), "cpu", SIZE)


def test_trigger_tokens_are_the_vision_tokens_the_patch_overlaps():
    from disp.backdoor import trigger_tokens
    assert trigger_tokens(BackdoorConfig(), 64, 8) == [0]
    assert trigger_tokens(BackdoorConfig(patch_position="bottom-right"), 64, 8) == [63]
    # a 12 px patch in the bottom-right corner of 48 px covers pixels 36-47: rows and columns 4-5 of 6
    assert trigger_tokens(BackdoorConfig(patch_size=12, patch_position="bottom-right"), 48, 8) == [28, 29, 34, 35]
    assert trigger_tokens(BackdoorConfig(patch_size=12, patch_position="top-right"), 48, 8) == [4, 5, 10, 11]
