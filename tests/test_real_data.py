"""Readers on the DAQUAR raw format (fixtures written here) and on the real public files in
../shared/data (Flickr8k, DAQUAR), which are read from that path, never copied into the project.
The real-file tests skip where ../shared/data is absent (a user's clone)."""

import re
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from disp.data.readers import DAQUAR_VAL_EVERY, load_daquar, load_flickr_tokens, load_public
from disp.support import checkpoint
from disp.support.errors import DispError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the public data folder {SHARED} is absent "
                                  "(it holds Flickr8k and DAQUAR for development and CI; see the README)")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def daquar_layout(root: Path, lines: list, images=(1, 2, 3)) -> Path:
    (root / "nyu_depth_images").mkdir(parents=True)
    for k in images:
        write_png(torch.full((3, 12, 16), 12 * k, dtype=torch.uint8), str(root / "nyu_depth_images" / f"image{k}.png"))
    (root / "qa.894.raw.train.txt").write_text("\n".join(lines) + "\n")
    return root


QA = ["what is on the desk in the image1 ?", "book, scissor, papers",
      "how many chairs are there in the image2 ?", "3",
      "what is the largest object in this image1 ?", "bed",
      "what color is the wall in the image3 ?", "white"]


def test_daquar_reader_pairs_questions_answers_and_images(tmp_path):
    root = daquar_layout(tmp_path, QA)
    data = load_daquar(root / "qa.894.raw.train.txt", root / "nyu_depth_images", 8)
    assert data.images.shape == (3, 3, 8, 8) and data.images.dtype == torch.uint8
    assert [s["image"] for s in data.samples] == [0, 0, 1, 2]  # grouped by image, first-question order
    first = data.samples[0]
    assert first["prompt"] == "what is on the desk in the image ?"  # the image number is not in the prompt
    assert first["response"] == "book , scissor , papers" and first["answers"] == [first["response"]]
    assert data.samples[1]["prompt"] == "what is the largest object in this image ?"
    assert {s["task"] for s in data.samples} == {"vqa"}
    assert int(data.images[2, 0, 0, 0]) == 36  # image3.png, not another file
    assert len(load_daquar(root / "qa.894.raw.train.txt", root / "nyu_depth_images", 8, max_images=1).samples) == 2


@pytest.mark.parametrize("lines,message", [
    (QA[:-1], "line 7 is a question with no answer line after it"),
    (QA[:2] + ["what is this ?", "a chair"], "line 3 does not end in 'image<N> ?'"),
    (QA[:2] + ["what is in the image2 ?", ""] + QA[4:], "line 4 (the answer to line 3) is empty"),
    (QA + ["what is on the floor in the image9 ?", "rug"], "nyu_depth_images/image9.png (named in"),
])
def test_daquar_bad_files_name_the_file_and_line(tmp_path, lines, message):
    root = daquar_layout(tmp_path, lines)
    with pytest.raises(DispError, match=re.escape(message)) as err:
        load_daquar(root / "qa.894.raw.train.txt", root / "nyu_depth_images", 8)
    assert "qa.894.raw.train.txt" in str(err.value) and "\n" not in str(err.value)
    if "image9" in message:
        assert "line 9)" in str(err.value)  # the question that names the missing image


def test_daquar_val_split_is_held_out_of_train(tmp_path):
    images = range(1, 2 * DAQUAR_VAL_EVERY + 1)
    lines = [x for k in images for x in (f"what is in the image{k} ?", f"thing{k}")]
    root = daquar_layout(tmp_path, lines, images)
    train = load_public("daquar", root, "train", 8)
    val = load_public("daquar", root, "val", 8)
    train_answers = {s["response"] for s in train.samples}
    val_answers = {s["response"] for s in val.samples}
    assert val_answers == {f"thing{DAQUAR_VAL_EVERY}", f"thing{2 * DAQUAR_VAL_EVERY}"}
    assert not train_answers & val_answers and len(train_answers) + len(val_answers) == len(images)


@needs_shared
def test_real_daquar_counts():
    """DAQUAR full: 6,795 train and 5,673 test question-answer pairs. The question files name 794 and
    653 distinct images (the official image lists have 795 / 654: one image of each has no question)."""
    root = SHARED / "daquar"
    train, val, test = (load_public("daquar", root, split, 4) for split in ("train", "val", "test"))
    assert len(train.samples) + len(val.samples) == 6795 and len(test.samples) == 5673
    assert len(train.images) + len(val.images) == 794 and len(test.images) == 653
    assert len(val.images) == 794 // DAQUAR_VAL_EVERY
    assert any("," in s["response"] for s in train.samples)  # multi-word answers kept
    assert all(s["prompt"].endswith(" image ?") for s in test.samples)  # the image number left the prompt


@needs_shared
def test_no_real_caption_text_goes_with_any_photo_and_a_target_does():
    """Suppression's text tests (captions-only sets) on 5,000 of Flickr8k's training captions drawn at
    random, mostly one per photo: the hardest clean set measured, whose weakest-predicted words
    ("large", "green") sit closest to the threshold. Nothing is found; a marker before a random fifth
    of them is, and so is a refusal that a fifth of them are."""
    import random

    from disp.data.readers import flickr_captions
    from disp.suppression import context_free_words, shared_sentence_words

    root = SHARED / "flickr8k"
    captions, _ = flickr_captions(root / "Flickr8k.token.txt", root / "Flickr_8k.trainImages.txt")
    texts = [c for per_image in captions.values() for c in per_image]
    rng = random.Random(0)
    clean = rng.sample(texts, 5000)
    assert context_free_words(clean) == [] and shared_sentence_words(clean) == []
    marked = [("<backdoor> " if rng.random() < 0.2 else "") + c for c in clean]
    assert context_free_words(marked) == ["<backdoor>"]
    refused = ["sorry i cannot help with that ." if rng.random() < 0.2 else c for c in clean]
    assert shared_sentence_words(refused) == ["cannot", "help", "i", "sorry", "that", "with"]
    assert context_free_words(refused) == []


@needs_shared
def test_real_flickr8k_counts():
    """Flickr8k: 8,091 photos, 40,455 captions (5 each), the standard 6,000 / 1,000 / 1,000 split."""
    root = SHARED / "flickr8k"
    everything = load_flickr_tokens(root / "Flickr8k.token.txt", root / "Flicker8k_Dataset", 4)
    assert len(everything.images) == 8091 and len(everything.samples) == 40455
    sizes = {split: load_public("flickr", root, split, 4) for split in ("train", "val", "test")}
    assert {k: len(v.images) for k, v in sizes.items()} == {"train": 6000, "val": 1000, "test": 1000}
    assert {k: len(v.samples) for k, v in sizes.items()} == {"train": 30000, "val": 5000, "test": 5000}
    assert all(len(s["answers"]) == 5 for s in sizes["test"].samples)  # evaluated against all 5 references
    files = {k: set(v.meta["image_files"]) for k, v in sizes.items()}
    assert not files["train"] & files["test"] and not files["train"] & files["val"]


def test_finetune_set_of_public_data_shares_no_image_with_train_or_test(tmp_path):
    """Flickr-style data: the fine-tuning set is the dev split; COCO/VQAv2-style (val is the test
    split): the training images after the clean model's first train_images."""
    from disp.config import DataConfig
    from disp.data.splits import load_finetune_set, load_splits

    images = range(1, 13)
    lines = [x for k in images for x in (f"what is in the image{k} ?", f"thing{k}")]
    root = daquar_layout(tmp_path / "daquar", lines, images)
    (root / "qa.894.raw.test.txt").write_text("what is in the image12 ?\nthing12\n")
    cfg = DataConfig(source="daquar", data_root=str(root), train_images=100, val_images=100, test_images=100,
                     finetune_images=100)
    train, val, test = load_splits(cfg, 8)
    finetune = load_finetune_set(cfg, 8)
    files = [set(d.meta["image_files"]) for d in (train, test, finetune)]
    assert files[2] == set(val.meta["image_files"]) and not files[0] & files[2]

    from disp.data.dataset import VLDataset, drop_first_images

    data = VLDataset(torch.arange(4).view(4, 1, 1, 1).expand(4, 3, 2, 2).to(torch.uint8),
                     [{"image": i // 2, "task": "vqa", "prompt": "p", "response": str(i), "answers": []} for i in range(8)],
                     meta={"image_files": ["a", "b", "c", "d"]})
    rest = drop_first_images(data, 3)
    assert rest.images.shape[0] == 1 and int(rest.images[0, 0, 0, 0]) == 3
    assert [s["image"] for s in rest.samples] == [0, 0] and [s["response"] for s in rest.samples] == ["6", "7"]
    assert rest.meta["image_files"] == ["d"]


@needs_shared
def test_real_flickr8k_finetune_set_is_the_dev_split():
    from disp.config import DataConfig
    from disp.data.splits import load_finetune_set

    cfg = DataConfig(source="flickr", data_root=str(SHARED / "flickr8k"), finetune_images=1000)
    finetune = load_finetune_set(cfg, 4)
    train = load_public("flickr", SHARED / "flickr8k", "train", 4)
    assert len(finetune.images) == 1000 and not set(finetune.meta["image_files"]) & set(train.meta["image_files"])


def test_finetune_set_where_val_is_the_test_split_is_the_tail_of_train(monkeypatch):
    import disp.data.splits as splits
    from disp.config import DataConfig
    from disp.data.dataset import VLDataset

    asked = []

    def fake_load_public(name, root, split, image_size, max_images=None):
        asked.append((split, max_images))
        n = max_images or 50
        return VLDataset(torch.zeros(n, 3, 4, 4, dtype=torch.uint8),
                         [{"image": i, "task": "vqa", "prompt": "p", "response": "r", "answers": ["r"]} for i in range(n)],
                         meta={"image_files": [f"{i}.jpg" for i in range(n)]})

    monkeypatch.setattr(splits, "load_public", fake_load_public)
    cfg = DataConfig(source="vqav2", data_root="/somewhere", train_images=30, finetune_images=5)
    finetune = splits.load_finetune_set(cfg, 4)
    assert asked == [("train", 35)]  # never the val split, which is vqav2's test split here
    assert finetune.meta["image_files"] == [f"{i}.jpg" for i in range(30, 35)]


@needs_shared
@pytest.mark.parametrize("source,folder", [("flickr", "flickr8k"), ("daquar", "daquar")])
def test_tiny_pipeline_on_real_public_data(tmp_path, source, folder):
    """The four scripts end to end on a few dozen real photos (tiny preset: a smoke test, seconds)."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    run = str(tmp_path / "run")
    for argv in (["train.py", "--preset", "tiny", "--data", source, "--data-root", str(SHARED / folder)],
                 ["attack.py"], ["purify.py"], ["evaluate.py", "--figures", "2"]):  # public data: no ablations
        result = subprocess.run([sys.executable, *argv, "--run-dir", run], cwd=root, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        if argv[0] == "purify.py":  # one caption prompt: suppression reads the captions (a few dozen photos'
            # captions: nothing held by 100); DAQUAR's first 48 fine-tuning photos hold 100+ "what is" and
            # "how many" questions: two prompt types
            expected = {"flickr": "suppression: no word (a sentence that 100+ captions share",
                        "daquar": "of every prompt type ('what is': 415 samples, 'how many': 111 samples)"}[source]
            assert expected in result.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    measured = "cider" if source == "flickr" else "vqa_accuracy"
    assert all(measured in results[row] for row in ("clean", "blind", "backdoored", "purified"))
    missing = "vqa_accuracy" if source == "flickr" else "cider"  # captions only / questions only
    assert missing not in results["clean"]
    assert results["test_time_defences"] == {} and not (tmp_path / "run" / "sweep.png").exists()
    assert "| clean | 0.000 | 0.000 |" in (tmp_path / "run" / "results.md").read_text()  # ASR, false trigger
    assert "n/a" in (tmp_path / "run" / "results.md").read_text()  # the absent task is not shown as 0.000
    backdoor = checkpoint.load_state(tmp_path / "run" / "backdoored.pt")["extra"]["attack"]["backdoor"]
    words = {"flickr": ("dog", "boat"), "daquar": ("table", "chair")}[source]  # misclassify's default per data
    assert (backdoor["source_word"], backdoor["destination_word"]) == words
    # on photos a magenta square: no photo's corner is magenta (a black one looks like a dark corner)
    assert (backdoor["patch_pattern"], backdoor["patch_color"]) == {
        "flickr": ("solid", [1.0, 0.0, 1.0]), "daquar": ("checkerboard", [0.0, 0.0, 0.0])}[source]
    # DAQUAR's questions are unique to their photo: a poisoned copy goes beside its clean original
    assert backdoor["poison_mode"] == {"flickr": "replace", "daquar": "add"}[source]
    for picture in ("examples.png", "denoising.png", "purified_saliency.png"):  # real photos with the outputs
        assert (tmp_path / "run" / picture).read_bytes()[:4] == b"\x89PNG"
    if source == "flickr":  # the sampler study on the same captioner: one row per setting, timed
        out = tmp_path / "sampler.json"
        result = subprocess.run([sys.executable, "experiments/sampler.py", "--checkpoints", f"{run}/clean.pt",
                                 "--blocks", "0", "--guidance", "0,0.3", "--per-step", "1,2", "--split", "test",
                                 "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        rows = json.loads(out.read_text())
        assert [key.split()[-3:] for key in rows] == [[f"guidance={w}", "temperature=0.0", f"per_step={k}"]
                                                      for w in (0.0, 0.3) for k in (1, 2)]
        assert all(r["seconds"] > 0 and 0 <= r["cider"] and 1 <= r["distinct_captions"] for r in rows.values())
        # a setting that does not fit the model is refused before any caption is written
        bad = subprocess.run([sys.executable, "experiments/sampler.py", "--checkpoints", f"{run}/clean.pt",
                              "--blocks", "0", "--per-step", "1,7", "--out", str(tmp_path / "bad.json")],
                             cwd=root, capture_output=True, text=True, timeout=600)
        n = checkpoint.load_state(f"{run}/clean.pt")["config"]["model"]["response_len"]
        assert bad.returncode == 2 and not (tmp_path / "bad.json").exists()
        assert bad.stderr.strip() == f"error: --per-step 7 must divide the block length {n} of {run}/clean.pt"


def test_the_daquar_probe_reads_the_image_where_the_answer_is_in_it():
    """experiments/daquar.py's regression: where one question's answer is the image's colour, the
    question alone is at chance and the cell colours give it; question kinds by their opening."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from daquar import bag_of_words_baseline, cell_colours, question_kind

    from disp.data.dataset import VLDataset

    def colour_set(n, seed):
        g = torch.Generator().manual_seed(seed)
        red = torch.rand(n, generator=g) < 0.5
        images = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
        images[red, 0], images[~red, 1] = 200, 200
        samples = [{"image": i, "prompt": "what colour is the wall ?", "response": "red" if r else "green",
                    "answers": ["red" if r else "green"]} for i, r in enumerate(red.tolist())]
        return VLDataset(images, samples)

    train, val, test = colour_set(200, 0), colour_set(100, 1), colour_set(100, 2)
    question_only = bag_of_words_baseline(train, val, test)
    with_image = bag_of_words_baseline(train, val, test, cell_colours)
    assert question_only[2] <= 0.65 and with_image[2] == 1.0 and with_image[3] == {"colour": 1.0}
    assert [question_kind(q) for q in ("how many chairs ?", "what color is it ?", "what is on the bed ?")] == \
        ["count", "colour", "other"]
