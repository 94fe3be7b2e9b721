"""Tests for the public-dataset readers in disp/data/readers.py.

Each test writes a tiny dataset in the real on-disk schema into tmp_path: three images of
different sizes and colour modes (RGB jpeg, grayscale png, RGBA png) plus the annotation file,
then checks shapes, dtypes, sample counts, shared image indices, text normalisation, split
filtering and the one-line DispError messages for broken inputs.
"""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import write_jpeg, write_png

from disp.data.dataset import CAPTION_PROMPT
from disp.data.readers import (
    load_coco_captions,
    load_flickr_tokens,
    load_karpathy,
    load_public,
    load_vqav2,
)
from disp.support.errors import DispError

SIZE = 8

# torchvision 0.29 flags its image codecs as deprecated (in favour of torchcodec) on every call.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


# ---------------------------------------------------------------------------------------------
# Fixture helpers
# ---------------------------------------------------------------------------------------------


def _write_png_raw(path: Path, pixels: np.ndarray, color_type: int, palette: bytes = b"") -> None:
    """A minimal 8-bit PNG encoder: torchvision's write_png refuses RGBA and palette images."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + (chunk(b"PLTE", palette) if palette else b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _write_images(folder: Path, names: list) -> None:
    """names[0]: RGB jpeg 20x30, names[1]: grayscale png 10x12, names[2]: RGBA png 7x9 (if given)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    writers = [
        lambda p: write_jpeg(torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=gen), str(p)),
        lambda p: write_png(torch.randint(0, 256, (1, 10, 12), dtype=torch.uint8, generator=gen), str(p)),
        lambda p: _write_png_raw(p, np.random.default_rng(0).integers(0, 256, (7, 9, 4), dtype=np.uint8), 6),
    ]
    for name, write in zip(names, writers):
        write(folder / name)


def _dump(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _coco(tmp_path: Path):
    names = ["a.jpg", "b.png", "c.png"]
    _write_images(tmp_path / "img", names)
    doc = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 30, "height": 20},
            {"id": 2, "file_name": "b.png"},
            {"id": 3, "file_name": "c.png"},
            {"id": 4, "file_name": "no_captions.jpg"},  # no captions: skipped, never opened
        ],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A Dog runs on the GRASS."},
            {"image_id": 2, "id": 11, "caption": "A gray square"},
            {"image_id": 1, "id": 12, "caption": "  a brown dog,  running "},
            {"image_id": 3, "id": 13, "caption": "Noise!"},
        ],
    }
    return _dump(tmp_path / "captions_val2014.json", doc), tmp_path / "img"


def _karpathy_doc(with_filepath: bool) -> dict:
    def image(name, split, folder, sentences):
        record = {"filename": name, "split": split, "imgid": 0,
                  "sentences": [{"raw": raw, "tokens": tokens} for raw, tokens in sentences]}
        if with_filepath:
            record["filepath"] = folder
        return record

    return {
        "images": [
            image("a.jpg", "train", "train2014", [("A man, riding.", ["a", "man", "riding"]),
                                                  ("Someone on a horse", ["Someone", "on", "a", "horse"])]),
            image("b.png", "restval", "val2014", [("Grey.", ["grey"])]),
            image("c.png", "val", "val2014", [("Colourful noise", ["colourful", "noise"])]),
            image("missing.jpg", "test", "val2014", [("Not on disk", ["not", "on", "disk"])]),
        ]
    }


def _karpathy_coco(tmp_path: Path):
    """dataset_coco.json layout: images under image_dir/<filepath>/<filename>."""
    _write_images(tmp_path / "img" / "train2014", ["a.jpg"])
    _write_images(tmp_path / "img" / "val2014", ["unused.jpg", "b.png", "c.png"])
    return _dump(tmp_path / "dataset_coco.json", _karpathy_doc(True)), tmp_path / "img"


_FLICKR_TOKENS = (
    "1000_a.jpg#0\tA child in a pink dress .\n"
    "1000_a.jpg#1\tA girl going into a wooden building.\n"
    "\n"
    "2000_b.png#0\tTwo DOGS, playing!\n"
    "3000_c.png#0\tA noisy picture\n"
    "3000_c.png#1\tColours everywhere\n"
    "3000_c.png#2\tStatic\n"
)


def _flickr(tmp_path: Path):
    _write_images(tmp_path / "Flicker8k_Dataset", ["1000_a.jpg", "2000_b.png", "3000_c.png"])
    token_file = tmp_path / "Flickr8k.token.txt"
    token_file.write_text(_FLICKR_TOKENS)
    return token_file, tmp_path / "Flicker8k_Dataset"


def _vqa(tmp_path: Path, split: str = "val"):
    names = [f"COCO_{split}2014_{i:012d}{ext}" for i, ext in [(42, ".jpg"), (7, ".png"), (123456, ".png")]]
    _write_images(tmp_path / f"{split}2014", names)
    (tmp_path / f"{split}2014" / "README.txt").write_text("not an image")  # ignored by the id index
    questions = {"questions": [
        {"image_id": 42, "question": "What color is the dog?", "question_id": 420},
        {"image_id": 7, "question": "Is it gray?", "question_id": 70},
        {"image_id": 42, "question": "How many dogs?", "question_id": 421},
        {"image_id": 123456, "question": "Is this noise?", "question_id": 1234560},
    ]}

    def annotation(qid, image_id, best, raw):
        return {"question_id": qid, "image_id": image_id, "multiple_choice_answer": best,
                "answer_type": "other", "question_type": "what",
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(raw)]}

    annotations = {"annotations": [
        annotation(420, 42, "Brown", ["Brown"] * 6 + ["brown.", "tan", "Brown", "light brown"]),
        annotation(70, 7, "yes", ["yes"] * 10),
        annotation(421, 42, "2", ["2"] * 9 + ["two"]),
        annotation(1234560, 123456, "yes", ["yes"] * 8 + ["no", "Yes!"]),
    ]}
    qpath = _dump(tmp_path / f"v2_OpenEnded_mscoco_{split}2014_questions.json", questions)
    apath = _dump(tmp_path / f"v2_mscoco_{split}2014_annotations.json", annotations)
    return qpath, apath, tmp_path / f"{split}2014"


def _check_images(ds, n_images: int) -> None:
    assert ds.images.shape == (n_images, 3, SIZE, SIZE)
    assert ds.images.dtype == torch.uint8
    assert all(set(s) == {"image", "task", "prompt", "response", "answers"} for s in ds.samples)
    assert sorted({s["image"] for s in ds.samples}) == list(range(n_images))  # every image is used


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def test_coco_captions(tmp_path):
    ann, img = _coco(tmp_path)
    ds = load_coco_captions(ann, img, SIZE)
    _check_images(ds, 3)
    assert len(ds) == 4
    by_image = {}
    for s in ds.samples:
        by_image.setdefault(s["image"], []).append(s)
        assert s["task"] == "caption" and s["prompt"] == CAPTION_PROMPT
    dog = by_image[0]  # a.jpg: both captions point at one image index
    assert [s["response"] for s in dog] == ["a dog runs on the grass .", "a brown dog , running"]
    assert all(s["answers"] == ["a dog runs on the grass .", "a brown dog , running"] for s in dog)
    assert by_image[2][0]["response"] == "noise !"
    # grayscale png decoded as RGB: three equal channels
    assert torch.equal(ds.images[1, 0], ds.images[1, 1]) and torch.equal(ds.images[1, 1], ds.images[1, 2])
    assert ds.meta["image_files"][0].endswith("a.jpg")


def test_coco_max_images(tmp_path):
    ann, img = _coco(tmp_path)
    ds = load_coco_captions(ann, img, SIZE, max_images=2)
    _check_images(ds, 2)
    assert len(ds) == 3


def test_karpathy_splits_and_filepath(tmp_path):
    split_json, img = _karpathy_coco(tmp_path)
    train = load_karpathy(split_json, img, "train", SIZE)  # train + restval
    _check_images(train, 2)
    assert [s["response"] for s in train.samples] == ["a man riding", "someone on a horse", "grey"]
    assert [s["image"] for s in train.samples] == [0, 0, 1]
    assert train.samples[0]["answers"] == ["a man riding", "someone on a horse"]
    assert train.meta["image_files"][0].endswith("train2014/a.jpg")

    val = load_karpathy(split_json, img, "val", SIZE)
    _check_images(val, 1)
    assert val.samples[0]["response"] == "colourful noise"

    restval = load_karpathy(split_json, img, "restval", SIZE)
    assert [s["response"] for s in restval.samples] == ["grey"]


def test_karpathy_flickr_schema(tmp_path):
    """dataset_flickr8k.json has no "filepath": all images sit in one folder."""
    _write_images(tmp_path / "images", ["a.jpg", "b.png", "c.png"])
    split_json = _dump(tmp_path / "dataset_flickr8k.json", _karpathy_doc(False))
    ds = load_karpathy(split_json, tmp_path / "images", "train", SIZE, max_images=1)
    _check_images(ds, 1)
    assert len(ds) == 2


def test_flickr_tokens(tmp_path):
    token_file, img = _flickr(tmp_path)
    ds = load_flickr_tokens(token_file, img, SIZE)
    _check_images(ds, 3)
    assert len(ds) == 6
    assert [s["image"] for s in ds.samples] == [0, 0, 1, 2, 2, 2]
    assert ds.samples[0]["response"] == "a child in a pink dress ."
    assert ds.samples[2]["response"] == "two dogs , playing !"
    assert ds.samples[3]["answers"] == ["a noisy picture", "colours everywhere", "static"]


def test_flickr_missing_image_names_the_token_file_line(tmp_path):
    token_file, img = _flickr(tmp_path)
    (img / "2000_b.png").unlink()
    with pytest.raises(DispError, match=r"2000_b.png \(named in .*Flickr8k.token.txt line 4\) does not exist"):
        load_flickr_tokens(token_file, img, SIZE)


def test_flickr_token_line_without_tab_names_the_line(tmp_path):
    token_file, img = _flickr(tmp_path)
    token_file.write_text(_FLICKR_TOKENS.replace("3000_c.png#1\t", "3000_c.png#1 "))
    with pytest.raises(DispError, match=r"Flickr8k.token.txt line 6 is not '<image>#<n><TAB><caption>'"):
        load_flickr_tokens(token_file, img, SIZE)


def test_flickr_image_list(tmp_path):
    token_file, img = _flickr(tmp_path)
    image_list = tmp_path / "Flickr_8k.trainImages.txt"
    image_list.write_text("3000_c.png\n2000_b.png  \n\n")
    ds = load_flickr_tokens(token_file, img, SIZE, image_list=image_list)
    _check_images(ds, 2)
    assert [s["response"] for s in ds.samples][0] == "two dogs , playing !"  # token-file order
    assert len(ds) == 4
    assert len(load_flickr_tokens(token_file, img, SIZE, image_list=image_list, max_images=1)) == 1


def test_vqav2(tmp_path):
    qpath, apath, img = _vqa(tmp_path)
    ds = load_vqav2(qpath, apath, img, SIZE)  # auto-detects COCO_val2014_<id>.jpg/png
    _check_images(ds, 3)
    assert len(ds) == 4
    assert [s["image"] for s in ds.samples] == [0, 0, 1, 2]  # grouped by image; image 42 is shared
    first = ds.samples[0]
    assert first["task"] == "vqa"
    assert first["prompt"] == "what color is the dog ?"
    assert first["response"] == "brown"
    assert len(first["answers"]) == 10
    assert first["answers"][6:] == ["brown .", "tan", "brown", "light brown"]
    assert ds.samples[3]["answers"][-1] == "yes !"


def test_vqav2_pattern_and_max_images(tmp_path):
    qpath, apath, img = _vqa(tmp_path)
    (img / "COCO_val2014_000000000007.png").rename(img / "seven.png")
    (img / "COCO_val2014_000000000042.jpg").rename(img / "x42.jpg")
    with pytest.raises(DispError, match="x7.jpg"):  # pattern names a file that is not there
        load_vqav2(qpath, apath, img, SIZE, image_pattern="x{image_id}.jpg")
    ds = load_vqav2(qpath, apath, img, SIZE, max_images=1, image_pattern="x{image_id}.jpg")
    _check_images(ds, 1)
    assert [s["prompt"] for s in ds.samples] == ["what color is the dog ?", "how many dogs ?"]
    with pytest.raises(DispError, match="image_pattern"):
        load_vqav2(qpath, apath, img, SIZE, image_pattern="{split}_{image_id}.jpg")


def test_load_public_layouts(tmp_path):
    # coco: annotations/captions_val2014.json + val2014/
    coco = tmp_path / "coco"
    ann, img = _coco(coco)
    (coco / "annotations").mkdir()
    ann.rename(coco / "annotations" / ann.name)
    img.rename(coco / "val2014")
    assert len(load_public("coco", coco, "val", SIZE)) == 4

    # karpathy: dataset_coco.json + images/train2014, images/val2014
    kar = tmp_path / "karpathy"
    _karpathy_coco(kar)
    (kar / "img").rename(kar / "images")
    assert len(load_public("karpathy", kar, "train", SIZE)) == 3

    # flickr: token file + Flicker8k_Dataset/ + split files
    fl = tmp_path / "flickr"
    _flickr(fl)
    (fl / "Flickr_8k.devImages.txt").write_text("1000_a.jpg\n")
    assert len(load_public("flickr", fl, "val", SIZE)) == 2
    with pytest.raises(DispError, match="Flickr_8k.testImages.txt"):
        load_public("flickr", fl, "test", SIZE)

    # vqav2: question + annotation files + train2014/
    vqa = tmp_path / "vqa"
    _vqa(vqa, split="train")
    assert len(load_public("vqav2", vqa, "train", SIZE, max_images=1)) == 2


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the file
# ---------------------------------------------------------------------------------------------


def _one_line_error(excinfo, name: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert name in message, message
    return message


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DispError) as excinfo:
        load_coco_captions(tmp_path / "nope.json", tmp_path, SIZE)
    assert "does not exist" in _one_line_error(excinfo, "nope.json")
    with pytest.raises(DispError) as excinfo:
        load_flickr_tokens(tmp_path / "missing.token", tmp_path, SIZE)
    _one_line_error(excinfo, "missing.token")


def test_missing_data_root_and_layout(tmp_path):
    with pytest.raises(DispError) as excinfo:
        load_public("coco", tmp_path / "absent", "train", SIZE)
    _one_line_error(excinfo, "absent")
    with pytest.raises(DispError) as excinfo:
        load_public("vqav2", tmp_path, "val", SIZE)
    _one_line_error(excinfo, "v2_OpenEnded_mscoco_val2014_questions.json")
    with pytest.raises(DispError, match="unknown public dataset"):
        load_public("imagenet", tmp_path, "train", SIZE)


def test_bad_json(tmp_path):
    bad = tmp_path / "captions.json"
    bad.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DispError) as excinfo:
        load_coco_captions(bad, tmp_path, SIZE)
    assert "is not valid JSON (line 2)" in _one_line_error(excinfo, "captions.json")


def test_missing_key(tmp_path):
    ann, img = _coco(tmp_path)
    doc = json.loads(ann.read_text())
    del doc["annotations"][3]["caption"]
    _dump(ann, doc)
    with pytest.raises(DispError) as excinfo:
        load_coco_captions(ann, img, SIZE)
    assert "annotation 3 has no 'caption' key" in _one_line_error(excinfo, ann.name)

    qpath, apath, vimg = _vqa(tmp_path / "vqa")
    doc = json.loads(apath.read_text())
    del doc["annotations"][1]["answers"][4]["answer"]
    _dump(apath, doc)
    with pytest.raises(DispError) as excinfo:
        load_vqav2(qpath, apath, vimg, SIZE)
    assert "annotation 1 answer 4 has no 'answer' key" in _one_line_error(excinfo, apath.name)


def test_bad_token_line(tmp_path):
    token_file, img = _flickr(tmp_path)
    token_file.write_text(_FLICKR_TOKENS + "no tab and no hash here\n")
    with pytest.raises(DispError) as excinfo:
        load_flickr_tokens(token_file, img, SIZE)
    assert "line 8" in _one_line_error(excinfo, token_file.name)


def test_missing_image(tmp_path):
    ann, img = _coco(tmp_path)
    (img / "b.png").unlink()
    with pytest.raises(DispError) as excinfo:
        load_coco_captions(ann, img, SIZE)
    _one_line_error(excinfo, "b.png")

    split_json, kimg = _karpathy_coco(tmp_path / "k")
    with pytest.raises(DispError) as excinfo:  # the test split lists missing.jpg
        load_karpathy(split_json, kimg, "test", SIZE)
    _one_line_error(excinfo, "missing.jpg")

    qpath, apath, vimg = _vqa(tmp_path / "vqa")
    (vimg / "COCO_val2014_000000000007.png").unlink()
    with pytest.raises(DispError) as excinfo:
        load_vqav2(qpath, apath, vimg, SIZE)
    _one_line_error(excinfo, "000000000007")


def test_corrupt_image(tmp_path):
    ann, img = _coco(tmp_path)
    (img / "c.png").write_bytes(np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8).tobytes())
    with pytest.raises(DispError) as excinfo:
        load_coco_captions(ann, img, SIZE)
    assert "could not be decoded" in _one_line_error(excinfo, "c.png")
    (img / "c.png").write_bytes(b"")  # empty file fails in read_file, not in the decoder
    with pytest.raises(DispError) as excinfo:
        load_coco_captions(ann, img, SIZE)
    _one_line_error(excinfo, "c.png")


def test_empty_result(tmp_path):
    split_json, img = _karpathy_coco(tmp_path)
    doc = json.loads(split_json.read_text())
    doc["images"] = [r for r in doc["images"] if r["split"] != "val"]
    _dump(split_json, doc)
    with pytest.raises(DispError) as excinfo:
        load_karpathy(split_json, img, "val", SIZE)
    assert "holds no samples" in _one_line_error(excinfo, split_json.name)


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "8"])
def test_bad_image_size(tmp_path, size):
    ann, img = _coco(tmp_path)
    with pytest.raises(DispError, match="image_size"):
        load_coco_captions(ann, img, size)
    with pytest.raises(DispError, match="image_size"):
        load_public("coco", tmp_path, "val", size)


def test_palette_png_is_rgb(tmp_path):
    """Palette (indexed-colour) PNGs come out as three channels with the palette's colours."""
    palette = bytes([255, 0, 0, 0, 0, 255])  # index 0 red, index 1 blue
    pixels = np.zeros((4, 4, 1), dtype=np.uint8)
    pixels[2:] = 1
    _write_png_raw(tmp_path / "p.png", pixels, 3, palette)
    (tmp_path / "tokens.txt").write_text("p.png#0\tred over blue\n")
    ds = load_flickr_tokens(tmp_path / "tokens.txt", tmp_path, 4)
    assert ds.images.shape == (1, 3, 4, 4)
    assert ds.images[0, :, 0, 0].tolist() == [255, 0, 0]
    assert ds.images[0, :, 3, 3].tolist() == [0, 0, 255]
