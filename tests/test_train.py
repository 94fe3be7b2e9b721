"""train.py end to end on the tiny preset, resume, and its one-line errors."""

import json
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from disp.support import checkpoint
from tests.conftest import run_main, save_then_interrupt_at

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    result = run("train.py", "--preset", "tiny", "--run-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_tiny_training_writes_checkpoint_and_metrics(tiny_run):
    model, tokenizer, config, state = checkpoint.load(tiny_run / "clean.pt", stages=["clean"])
    assert state["finished"] and config.preset == "tiny"
    metrics = json.loads((tiny_run / "clean_metrics.json").read_text())["metrics"]
    for key in ("cider", "bleu4", "caption_exact_match", "vqa_accuracy"):
        assert 0.0 <= metrics[key] <= 10.0
    assert not (tiny_run / "clean.resume.pt").exists()


def test_resume_is_bit_identical(tiny_run, tmp_path, monkeypatch):
    """Interrupt right after the step-10 resume checkpoint (as Ctrl-C would), resume, compare."""
    import train

    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", save_then_interrupt_at(10))
    with pytest.raises(KeyboardInterrupt):
        train.main(["--preset", "tiny", "--run-dir", str(tmp_path)])
    assert not (tmp_path / "clean.pt").exists() and (tmp_path / "clean.resume.pt").exists()
    monkeypatch.setattr(checkpoint, "save", real_save)
    train.main(["--run-dir", str(tmp_path), "--resume"])
    resumed = checkpoint.load_state(tmp_path / "clean.pt")["model"]
    straight = checkpoint.load_state(tiny_run / "clean.pt")["model"]
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    metrics = json.loads((tmp_path / "clean_metrics.json").read_text())["metrics"]
    reference = json.loads((tiny_run / "clean_metrics.json").read_text())["metrics"]
    metrics.pop("minutes"), reference.pop("minutes")
    assert metrics == reference


def test_training_on_a_public_dataset_layout(tmp_path):
    """Karpathy-split fixture on disk: no per-patch labels, so vision pretraining uses bag of words."""
    from torchvision.io import write_png

    root = tmp_path / "karpathy"
    images = []
    for k, split in enumerate(["train", "train", "restval", "val", "test"]):
        folder = root / "images" / "val2014"
        folder.mkdir(parents=True, exist_ok=True)
        write_png(torch.randint(0, 256, (3, 20 + k, 30), dtype=torch.uint8), str(folder / f"{k}.png"))
        sentences = [{"raw": f"A red thing number {k}.", "tokens": ["a", "red", "thing", "number", str(k)]},
                     {"raw": "Some noise.", "tokens": ["some", "noise"]}]
        images.append({"filepath": "val2014", "filename": f"{k}.png", "split": split, "sentences": sentences})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    result = run("train.py", "--preset", "tiny", "--data", "karpathy", "--data-root", str(root),
                 "--run-dir", str(tmp_path / "run"), "--sft-steps", "4", "--vision-steps", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    _, tokenizer, config, _ = checkpoint.load(tmp_path / "run" / "clean.pt")
    assert config.data.source == "karpathy" and config.model.patch_classes == [len(tokenizer)]
    # the photo levers: contrastive + words objective, crops, a convolutional stem; recorded in clean.pt
    result = run("train.py", "--preset", "tiny", "--data", "karpathy", "--data-root", str(root),
                 "--run-dir", str(tmp_path / "levers"), "--sft-steps", "4", "--vision-steps", "2",
                 "--vision-objective", "both", "--vision-crop", "0.6", "--conv-stem", "1", "--block-length", "4",
                 "--sft-vit-lr", "1e-4", "--image-free", "0.1", "--guidance", "0.3",
                 "--temperature", "0.5")
    assert result.returncode == 0, result.stderr[-2000:]
    model, _, config, _ = checkpoint.load(tmp_path / "levers" / "clean.pt")
    assert (config.train.vision_objective, config.train.vision_crop, config.model.conv_stem) == ("both", 0.6, True)
    assert (config.model.block_length, config.train.sft_vit_lr) == (4, 1e-4) and config.model.response_len % 4 == 0
    assert (config.train.image_free, config.model.guidance, config.model.temperature) == (0.1, 0.3, 0.5)
    assert hasattr(model.vit, "stem") and not hasattr(model.vit, "patch_embed")


@pytest.mark.parametrize("args,message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--data", "imagenet"], "unknown --data 'imagenet'"),
    (["--data", "coco"], "--data coco needs --data-root"),
    (["--data", "coco", "--data-root", "/nonexistent/coco"], "/nonexistent/coco"),
    (["--resume", "--run-dir", "/nonexistent/run"], "does not exist"),
    (["--precision", "fp16"], "unknown --precision 'fp16'"),
    (["--sft-steps", "0"], "--sft-steps must be > 0, got 0"),
    (["--sft-steps", "-1"], "--sft-steps must be > 0, got -1"),
    (["--vision-steps", "-2"], "--vision-steps must be >= 0, got -2"),
    (["--vision-objective", "captions"], "unknown --vision-objective 'captions'"),
    (["--vision-crop", "0"], "--vision-crop must be in (0, 1], got 0.0"),
    (["--vision-crop", "1.5"], "--vision-crop must be in (0, 1], got 1.5"),
    (["--conv-stem", "2"], "--conv-stem must be 0 or 1, got 2"),
    (["--block-length", "-4"], "--block-length must be >= 0, got -4"),
    (["--sft-vit-lr=-1e-4"], "--sft-vit-lr must be >= 0, got -0.0001"),
    (["--image-free", "1"], "--image-free must be in [0, 1), got 1.0"),
    (["--guidance=-0.5"], "--guidance must be >= 0, got -0.5"),
    (["--temperature=-1"], "--temperature must be >= 0, got -1.0"),
    (["--vision-from", "/nonexistent/run/clean.pt"], "folder /nonexistent/run does not exist (looked for checkpoint clean.pt"),
])
def test_bad_input_gives_one_line_error(args, message, tmp_path):
    """In-process, as `python train.py ...` runs it (tests.conftest.run_main); nothing is written."""
    code, stderr = run_main("train.py", ["--preset", "tiny", "--run-dir", str(tmp_path / "run"), *args])
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert not (tmp_path / "run").exists()


def test_vision_from_copies_the_vit_and_skips_pretraining(tiny_run, tmp_path):
    """--vision-from: the new run's frozen ViT is the source's, its pretraining heads aside, unless
    --vision-steps pretrains it further; a ViT of another shape is a one-line error."""
    source = tiny_run / "clean.pt"
    result = run("train.py", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--vision-from", str(source),
                 "--seed", "1", "--sft-steps", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vision pretraining" not in result.stderr
    _, _, config, state = checkpoint.load(tmp_path / "run" / "clean.pt")
    assert config.train.vision_from == str(source.resolve()) and config.train.vision_steps == 0
    reference = checkpoint.load_state(source)["model"]
    vit = [k for k in reference if k.startswith("vit.") and not k.startswith("vit.patch_heads.")]
    assert vit and all(torch.equal(state["model"][k], reference[k]) for k in vit)
    assert not torch.equal(state["model"]["lm_head.weight"], reference["lm_head.weight"])  # seed 1's own text model
    # --vision-steps N on top: the copied ViT is pretrained further on this run's images
    result = run("train.py", "--preset", "tiny", "--run-dir", str(tmp_path / "more"), "--vision-from", str(source),
                 "--vision-steps", "2", "--sft-steps", "2")
    assert result.returncode == 0 and "vision pretraining" in result.stderr, result.stderr[-2000:]
    more = checkpoint.load_state(tmp_path / "more" / "clean.pt")["model"]
    assert not all(torch.equal(more[k], reference[k]) for k in vit)
    result = run("train.py", "--preset", "tiny", "--run-dir", str(tmp_path / "stem"), "--vision-from", str(source),
                 "--conv-stem", "1", "--sft-steps", "4")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: ") and "conv_stem False vs True" in lines[-1]


@pytest.mark.parametrize("flag", ["bf16", "auto"])
def test_training_precision_runs_and_is_recorded_resolved(tmp_path, flag):
    from disp.support.runtime import resolve_precision
    result = run("train.py", "--preset", "tiny", "--run-dir", str(tmp_path), "--precision", flag,
                 "--sft-steps", "4", "--vision-steps", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    _, _, config, state = checkpoint.load(tmp_path / "clean.pt", stages=["clean"])
    assert config.train.precision == resolve_precision(flag, "cpu") in ("fp32", "bf16")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_random_vision_mask_hides_a_uniform_share_of_image_positions():
    """Each sample hides U(0, max) of its 36 positions: about max/2 on average, never far above max."""
    from disp.training import random_vision_mask

    mask = random_vision_mask(4000, 36, 0.15, torch.Generator().manual_seed(0), "cpu")
    assert mask.shape == (4000, 36) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.075) < 0.005
    assert mask.float().mean(1).max() < 0.4  # a row's share stays near its draw below 0.15
    assert not random_vision_mask(100, 36, 0.0, torch.Generator().manual_seed(0), "cpu").any()


def test_image_free_share_hides_whole_images_and_leaves_the_rest_as_before():
    """image_free 0.1: about a tenth of the rows hide all 64 positions; the others keep their U(0, max)
    share, so they stay far from fully hidden."""
    from disp.training import random_vision_mask

    mask = random_vision_mask(4000, 64, 0.15, torch.Generator().manual_seed(0), "cpu", image_free=0.1)
    blind = mask.all(1)
    assert abs(blind.float().mean().item() - 0.1) < 0.015
    assert mask[~blind].float().mean(1).max() < 0.4
    assert abs(mask[~blind].float().mean().item() - 0.075) < 0.005
    assert not random_vision_mask(100, 64, 0.0, torch.Generator().manual_seed(0), "cpu", image_free=0.0).any()


def test_patch_pixels_match_a_naive_crop_and_the_pixel_term_adds_to_the_loss():
    from disp.config import ModelConfig
    from disp.model import ViT
    from disp.training import patch_pixels, vision_pretraining_loss

    images = torch.rand(2, 3, 16, 16)
    targets = patch_pixels(images, 8)  # (2, 4 patches, 192)
    for b in range(2):
        for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # row-major patch order, as the ViT's
            crop = images[b, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8]
            assert torch.allclose(targets[b, k], (crop.permute(1, 2, 0).reshape(-1) - 0.5) / 0.5)
    torch.manual_seed(0)
    vit = ViT(ModelConfig(image_size=16, patch_size=8, vit_dim=16, vit_depth=1, vit_heads=2, patch_classes=[5]))
    decoder = torch.nn.Linear(16, 192)
    bow = torch.zeros(2, 5)
    alone = vision_pretraining_loss(vit, images, texts_bow=bow)
    with_pixels = vision_pretraining_loss(vit, images, texts_bow=bow, pixel_decoder=decoder, pixel_loss=0.5)
    mse = torch.nn.functional.mse_loss(decoder(vit(images)), targets)
    assert with_pixels.item() == pytest.approx(alone.item() + 0.5 * mse.item(), rel=1e-5)


def test_public_data_picks_the_photo_preset():
    from train import new_config, parse_args

    public = new_config(parse_args(["--data", "flickr", "--data-root", "/somewhere"]), "cpu")
    assert public.preset == "photo" and public.model.n_vision >= 64 and public.data.min_word_count > 1
    assert new_config(parse_args([]), "cpu").preset == "cpu"
    daquar = new_config(parse_args(["--data", "daquar", "--data-root", "/somewhere"]), "cpu")
    assert daquar.preset == "daquar" and daquar.train.attack_epochs > public.train.attack_epochs
    assert (replace(daquar.model, block_length=4, guidance=0.3, temperature=0.2), daquar.data.min_word_count) == \
        (public.model, public.data.min_word_count)  # the same model; DAQUAR's short answers greedy in one block
    assert (daquar.model.block_length, public.model.block_length) == (0, 4)
    assert (daquar.model.guidance, public.model.guidance) == (0.0, 0.3)
    assert (daquar.model.temperature, public.model.temperature) == (0.0, 0.2)
    assert new_config(parse_args(["--preset", "tiny", "--data", "flickr"]), "cpu").preset == "tiny"


def test_contrastive_loss_matches_a_hand_computed_case():
    """Two pairs, unit embeddings at right angles, logit scale log(2): the similarity logits are
    [[2, 0], [0, 2]], so each row's and each column's loss is log(1 + e^-2)."""
    from disp.training import contrastive_loss

    image, text = torch.tensor([[3.0, 0.0], [0.0, 0.5]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    expected = torch.log1p(torch.exp(torch.tensor(-2.0)))
    assert torch.allclose(contrastive_loss(image, text, torch.tensor(2.0).log()), expected)
    # swapped texts: every image's own text is now the wrong one, loss log(1 + e^2)
    assert torch.allclose(contrastive_loss(image, text.flip(0), torch.tensor(2.0).log()), expected + 2)
    # asymmetric: the mean of the image->text and the text->image cross-entropies
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    logits = 2 * torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    both = (torch.nn.functional.cross_entropy(logits, torch.arange(2))
            + torch.nn.functional.cross_entropy(logits.T, torch.arange(2))) / 2
    assert torch.allclose(contrastive_loss(image, text, torch.tensor(2.0).log()), both)


def test_random_crops_keep_shape_and_labels_and_cut_inside_the_image():
    from disp.training import random_crops

    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 16, 16)
    assert torch.equal(random_crops(images, 1.0, g), images)  # a full-side crop is the image
    crops = random_crops(images, 0.5, g)
    assert crops.shape == images.shape and crops.dtype == images.dtype
    # a constant image stays constant whatever the crop (no padding came in from outside)
    flat = torch.full((4, 3, 16, 16), 0.3)
    assert torch.allclose(random_crops(flat, 0.25, g), flat)
    # the crop's side is at least half of the image: a 2x2 checker of 8 px tiles keeps >= 2 colours
    checker = torch.zeros(1, 3, 16, 16)
    checker[..., :8, :8] = checker[..., 8:, 8:] = 1.0
    for _ in range(20):
        crop = random_crops(checker, 0.5, g)
        assert crop.min() < 0.5 < crop.max()
    # on a left-to-right ramp a crop spans the share of the width it kept: between 0.5 and 1, not always 1
    ramp = torch.linspace(0, 1, 32).expand(200, 3, 32, 32).contiguous()
    crops = random_crops(ramp, 0.5, g)[:, 0, 0]  # (200, 32): the first row of each crop
    spans = crops.max(1).values - crops.min(1).values
    assert spans.min() > 0.45 and spans.max() <= 1.0 + 1e-6 and (spans < 0.75).any()


def test_conv_stem_tokens_follow_the_patch_grid_row_by_row():
    """With a convolutional stem the ViT still returns one token per patch, in the patch order of the
    linear embedding: a change inside patch (row 0, column 5) moves its token and its neighbours', not
    a token of the far corner."""
    from disp.config import ModelConfig
    from disp.model import ViT

    torch.manual_seed(0)
    vit = ViT(ModelConfig(vit_dim=32, vit_depth=0, conv_stem=True)).eval()  # 48 px, 8 px patches
    images = torch.rand(1, 3, 48, 48)
    changed = images.clone()
    changed[..., 2:6, 42:46] = 1 - changed[..., 2:6, 42:46]  # inside patch (0, 5)
    with torch.no_grad():
        moved = (vit.stem((changed - 0.5) / 0.5) - vit.stem((images - 0.5) / 0.5)).abs().sum(1)  # (1, 6, 6)
        tokens = (vit(changed) - vit(images)).abs().sum(-1)[0]  # (36,)
    assert vit(images).shape == (1, 36, 32)
    assert moved[0, 0, 5] > 0 and moved[0, 5, 0] == 0 and moved[0, 3:, :3].sum() == 0
    assert tokens[5] > 0 and tokens[35] == 0 and tokens[30] == 0


@pytest.mark.parametrize("vit_lr", [0.0, 1e-3])
def test_sft_trains_the_vit_only_when_given_a_rate(vit_lr):
    """sft_vit_lr 0: the ViT stays frozen (its features cached); > 0: it trains, at its own peak rate."""
    from disp.config import get_preset, with_vocabulary
    from disp.data.batching import encode_dataset
    from disp.data.splits import load_splits
    from disp.data.tokenizer import Tokenizer
    from disp.training import Finetuner, lr_at

    config = get_preset("tiny")
    train, _, _ = load_splits(config.data, config.model.image_size)
    tokenizer = Tokenizer.for_samples(train.samples)
    model = checkpoint.build_model(with_vocabulary(config, len(tokenizer), train.meta["patch_classes"]), tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Finetuner(model, train.images, encode_dataset(train, tokenizer, config.model),
                        params=model.text_parameters(), steps=4, cfg=config.train, device="cpu", vit_lr=vit_lr)
    assert (trainer.vit_features is None) == (vit_lr > 0)
    for step in range(2):
        trainer.step(step)
    peaks = [config.train.lr] + ([vit_lr] if vit_lr else [])
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [lr_at(1, 4, peak, trainer.warmup) for peak in peaks]
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    vit_moved = {n for n in moved if n.startswith("vit.")}
    assert "projector.0.weight" in moved
    assert vit_moved == ({n for n in before if n.startswith("vit.") and not n.startswith("vit.patch_heads.")}
                         if vit_lr else set())
