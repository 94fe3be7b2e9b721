"""Readers for public image-text datasets on disk: COCO captions, Karpathy splits, Flickr8k/30k, VQAv2,
DAQUAR.

Each reader turns a dataset's official files into a `VLDataset` (disp/data/dataset.py). Nothing is
downloaded: readers take paths. `load_public` knows each dataset's standard folder layout.
"""

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from disp.data.dataset import CAPTION_PROMPT, VLDataset, check_not_empty
from disp.data.tokenizer import normalize_text
from disp.support.errors import DispError

# ---------------------------------------------------------------------------------------------
# Readers for public datasets on disk.
#
# Every reader follows the same three steps, so the error handling lives in one place:
#   1. parse the annotation file(s) into an ordered list of images, each with its samples;
#   2. check that every selected image file exists (cheap, and fails before minutes of decoding). A
#      missing image is an error, not a skip: it means a broken download or a wrong folder, and a
#      split that silently lost images would no longer be the published one results compare on;
#   3. decode each image once, convert to RGB, resize to (image_size, image_size), store uint8.
# Each problem raises DispError with one line that names the file and says how to fix it.
# ---------------------------------------------------------------------------------------------

# torchvision prefixes its C++ errors with "function, /path/to/file.cpp:123, "; users need the rest.
_CPP_PREFIX = re.compile(r"^\w+, \S+:\d+, ")
# COCO-style file names end in the zero-padded 12-digit image id ("COCO_val2014_000000000042.jpg",
# "000000000042.jpg" in the 2017 release).
_COCO_ID_NAME = re.compile(r"(\d{12})\.(?:jpg|jpeg|png)$", re.IGNORECASE)


class _Image:
    """One image to load, the samples (without image index yet) that point at it, and where the
    annotation file first names it (e.g. "line 12"), for error messages."""

    __slots__ = ("path", "samples", "where")

    def __init__(self, path: Path, where: str = ""):
        self.path, self.where = path, where
        self.samples = []


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return _CPP_PREFIX.sub("", text) or type(err).__name__


def _check_image_size(image_size) -> int:
    # bool is an int subclass; True would silently mean 1x1 images.
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise DispError(f"image_size must be a positive int (pixels per side), got {image_size!r}")
    return image_size


def _check_max_images(max_images) -> Optional[int]:
    if max_images is None:
        return None
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images <= 0:
        raise DispError(f"max_images must be a positive int or None, got {max_images!r}")
    return max_images


def _require_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        reason = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DispError(f"{what} {path} {reason}; check the path (nothing is downloaded, fetch it yourself)")
    return path


def _require_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        reason = "is a file, not a folder" if path.exists() else "does not exist"
        raise DispError(f"{what} {path} {reason}; point it at the folder that holds the image files")
    return path


def _read_json(path, what: str):
    path = _require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DispError(
            f"{path} is not valid JSON (line {err.lineno}): {err.msg}; re-download or repair the file"
        ) from None
    except UnicodeDecodeError as err:
        raise DispError(f"{path} is not valid JSON (not UTF-8 text: {err.reason}); re-download the file") from None
    except OSError as err:
        raise DispError(f"cannot read {path} ({_one_line(err)}); check its permissions") from None


def _read_lines(path, what: str) -> list:
    path = _require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as err:
        raise DispError(f"{path} is not UTF-8 text ({err.reason}); re-download the file") from None
    except OSError as err:
        raise DispError(f"cannot read {path} ({_one_line(err)}); check its permissions") from None


def _field(record, key: str, path: Path, where: str, kind=None):
    """record[key], or a one-line DispError naming the file and the record ("annotation 3")."""
    if not isinstance(record, dict):
        raise DispError(f"{path}: {where} is not a JSON object; is this the right file?")
    if key not in record:
        raise DispError(f"{path}: {where} has no '{key}' key; is this the right file for this reader?")
    value = record[key]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DispError(f"{path}: {where} '{key}' should be a {names}, got {type(value).__name__}")
    return value


def _id(record, key: str, path: Path, where: str):
    # Ids are used as dict keys, so they must be hashable scalars.
    return _field(record, key, path, where, (int, str))


def _top_list(doc, key: str, path: Path):
    if not isinstance(doc, dict):
        raise DispError(f"{path}: expected a JSON object with a '{key}' list at the top; is this the right file?")
    return _field(doc, key, path, "the top-level object", list)


def _load_image(path: Path, image_size: int) -> torch.Tensor:
    """Decode any jpeg/png/webp/gif as RGB uint8 (3, image_size, image_size)."""
    # imported here: torchvision takes seconds to import, and most runs (the scenes) read no photo
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2 import functional as TF
    try:
        data = read_file(str(path))
    except RuntimeError as err:
        raise DispError(f"cannot read image {path} ({_one_line(err)}); replace the file") from None
    try:
        # mode RGB converts grayscale, grayscale+alpha, RGBA and palette images to 3 channels.
        image = decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as err:
        raise DispError(
            f"image {path} could not be decoded ({_one_line(err)}); re-download or replace the file"
        ) from None
    if image.dim() == 4:  # animated gif: keep the first frame
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit png
        image = TF.to_dtype(image, torch.uint8, scale=True)
    # Squash to a square (no crop), so every caption still sees the whole scene it describes.
    return TF.resize(image, [image_size, image_size], antialias=True)


def _assemble(entries: list, image_size: int, source: str, meta: dict) -> VLDataset:
    """Check files, decode each image once, and give samples their image index.

    Samples come out grouped by image, in image order, so neighbours share an image.
    """
    samples = []
    for index, entry in enumerate(entries):
        for sample in entry.samples:
            samples.append({"image": index, **sample})
    if not samples:  # fail before touching any image
        check_not_empty(VLDataset(torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8), []), source)
    for entry in entries:
        if not entry.path.is_file():
            named = f"named in {source}" + (f" {entry.where}" if entry.where else "")
            raise DispError(
                f"image file {entry.path} ({named}) does not exist; "
                f"check the image folder, or restrict the split / max_images"
            )
    # Preallocate once: a list of tensors plus torch.stack would need twice the memory at the end.
    images = torch.empty(len(entries), 3, image_size, image_size, dtype=torch.uint8)
    for index, entry in enumerate(entries):
        images[index] = _load_image(entry.path, image_size)
    meta = {"source": source, "image_files": [str(e.path) for e in entries], **meta}
    return check_not_empty(VLDataset(images=images, samples=samples, meta=meta), source)


def _caption_samples(captions: list) -> list:
    """One caption sample per caption; every sample keeps all captions of the image as references."""
    captions = [c for c in captions if c]  # an empty target teaches nothing
    return [
        {"task": "caption", "prompt": CAPTION_PROMPT, "response": c, "answers": list(captions)}
        for c in captions
    ]


def load_coco_captions(annotations_json, image_dir, image_size: int, max_images: Optional[int] = None) -> VLDataset:
    """COCO captions (captions_train2014.json, captions_val2014.json, the 2017 files alike).

    Schema: {"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "id", "caption"}]}.
    One "caption" sample per (image, caption); `answers` holds all captions of that image.
    Images keep the order of the "images" list (those without captions are skipped); max_images
    keeps the first ones. Record numbers in error messages count from 0.
    """
    image_size = _check_image_size(image_size)
    max_images = _check_max_images(max_images)
    path = Path(annotations_json)
    doc = _read_json(path, "COCO captions file")
    image_dir = _require_dir(image_dir, "COCO image folder")

    files = {}
    for i, record in enumerate(_top_list(doc, "images", path)):
        image_id = _id(record, "id", path, f"image {i}")
        files[image_id] = _field(record, "file_name", path, f"image {i}", str)
    captions = {image_id: [] for image_id in files}
    for i, record in enumerate(_top_list(doc, "annotations", path)):
        image_id = _id(record, "image_id", path, f"annotation {i}")
        caption = _field(record, "caption", path, f"annotation {i}", str)
        if image_id not in captions:
            raise DispError(f"{path}: annotation {i} points at image_id {image_id!r}, which is not in 'images'")
        captions[image_id].append(normalize_text(caption))

    entries = []
    for image_id, file_name in files.items():
        samples = _caption_samples(captions[image_id])
        if not samples:
            continue
        if max_images is not None and len(entries) >= max_images:
            break
        entry = _Image(image_dir / file_name, f"(image_id {image_id})")
        entry.samples = samples
        entries.append(entry)
    return _assemble(entries, image_size, str(path), {"dataset": "coco"})


# "train" takes "restval" too: the 30k COCO val images outside the 5k val/test splits, which the
# Karpathy-split literature always trains on.
_KARPATHY_SPLITS = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}, "restval": {"restval"}}


def load_karpathy(split_json, image_dir, split: str, image_size: int, max_images: Optional[int] = None) -> VLDataset:
    """Karpathy splits: dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json.

    Schema: {"images": [{"filepath" (COCO only), "filename", "split", "sentences": [{"tokens", "raw"}]}]}.
    split: "train" (train + restval), "val", "test", or "restval" alone.
    Image path: image_dir/filepath/filename when "filepath" is present (COCO: train2014/ or val2014/),
    else image_dir/filename. The response is the sentence tokens joined by spaces, lower-cased
    (the raw sentence when a file has no tokens).
    """
    image_size = _check_image_size(image_size)
    max_images = _check_max_images(max_images)
    if split not in _KARPATHY_SPLITS:
        raise DispError(f"Karpathy split must be one of {sorted(_KARPATHY_SPLITS)}, got {split!r}")
    wanted = _KARPATHY_SPLITS[split]
    path = Path(split_json)
    doc = _read_json(path, "Karpathy split file")
    image_dir = _require_dir(image_dir, "Karpathy image folder")

    entries = []
    for i, record in enumerate(_top_list(doc, "images", path)):
        where = f"image {i}"
        if _field(record, "split", path, where, str) not in wanted:
            continue
        if max_images is not None and len(entries) >= max_images:
            break
        file_name = _field(record, "filename", path, where, str)
        # Only dataset_coco.json has "filepath" (train2014 / val2014); the Flickr files keep all in one folder.
        folder = _field(record, "filepath", path, where, str) if "filepath" in record else ""
        captions = []
        for j, sentence in enumerate(_field(record, "sentences", path, where, list)):
            swhere = f"{where} sentence {j}"
            if isinstance(sentence, dict) and "tokens" in sentence:
                tokens = _field(sentence, "tokens", path, swhere, list)
                text = " ".join(str(t) for t in tokens)
            else:
                text = _field(sentence, "raw", path, swhere, str)
            captions.append(normalize_text(text))
        samples = _caption_samples(captions)
        if not samples:
            continue
        entry = _Image(image_dir / folder / file_name)
        entry.samples = samples
        entries.append(entry)
    return _assemble(entries, image_size, f"{path} split {split!r}", {"dataset": "karpathy", "split": split})


def flickr_captions(token_file, image_list=None) -> tuple:
    """The captions of a Flickr token file, without the photos: ({file name: [normalised captions]},
    {file name: the line that first names it}), in the order the file first names the images;
    image_list keeps only the images it names. Line numbers count from 1."""
    path = Path(token_file)
    lines = _read_lines(path, "Flickr token file")
    keep = None
    if image_list is not None:
        keep = {line.strip() for line in _read_lines(image_list, "Flickr image list") if line.strip()}
    captions, first_line = {}, {}  # dicts keep first-seen order
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        file_name, hash_, _ = name.strip().rpartition("#")
        if not tab or not hash_ or not file_name:
            raise DispError(
                f"{path} line {number} is not '<image>#<n><TAB><caption>': {line[:60]!r}; is this a Flickr token file?"
            )
        if keep is not None and file_name not in keep:
            continue
        captions.setdefault(file_name, []).append(normalize_text(caption))
        first_line.setdefault(file_name, number)
    return captions, first_line


def load_flickr_tokens(
    token_file, image_dir, image_size: int, image_list=None, max_images: Optional[int] = None
) -> VLDataset:
    """Flickr8k / Flickr30k caption token files (Flickr8k.token.txt, results_20130124.token).

    Each line: "<file name>#<caption number>\\t<caption>", e.g.
    "1000268201_693b08cb0e.jpg#0\\tA child in a pink dress ." Images keep the order in which the
    token file first names them. image_list (e.g. Flickr_8k.trainImages.txt, one file name per line)
    keeps only the images it names. Line numbers in error messages count from 1.
    """
    image_size = _check_image_size(image_size)
    max_images = _check_max_images(max_images)
    path = Path(token_file)
    captions, first_line = flickr_captions(path, image_list)
    image_dir = _require_dir(image_dir, "Flickr image folder")

    entries = []
    for file_name, texts in captions.items():
        samples = _caption_samples(texts)
        if not samples:
            continue
        if max_images is not None and len(entries) >= max_images:
            break
        entry = _Image(image_dir / file_name, f"line {first_line[file_name]}")
        entry.samples = samples
        entries.append(entry)
    source = str(path) if image_list is None else f"{path} (images from {image_list})"
    return _assemble(entries, image_size, source, {"dataset": "flickr"})


def _coco_id_index(image_dir: Path) -> dict:
    """image id -> file name for every file ending in a 12-digit COCO id; one directory scan."""
    index = {}
    with os.scandir(image_dir) as it:
        for item in sorted(it, key=lambda e: e.name):  # sorted: the same file wins on every machine
            match = _COCO_ID_NAME.search(item.name)
            if match:
                index.setdefault(int(match.group(1)), item.name)
    return index


def load_vqav2(
    questions_json,
    annotations_json,
    image_dir,
    image_size: int,
    max_images: Optional[int] = None,
    image_pattern: Optional[str] = None,
) -> VLDataset:
    """VQAv2 (v2_OpenEnded_mscoco_*_questions.json + v2_mscoco_*_annotations.json).

    Questions: {"questions": [{"image_id", "question", "question_id"}]}.
    Annotations: {"annotations": [{"question_id", "image_id", "answers": [{"answer", ...}],
    "multiple_choice_answer", "answer_type", "question_type"}]}.
    One "vqa" sample per question: prompt = question, response = multiple_choice_answer,
    answers = the raw human answers (10 per question in the real data), all normalised.
    Image file: image_pattern.format(image_id=...) when given, e.g.
    "COCO_val2014_{image_id:012d}.jpg"; by default the file in image_dir whose name ends in the
    12-digit id (found with one scan of the folder). Images keep the order of their first question
    and samples are grouped by image; max_images keeps the first images. Record numbers in error
    messages count from 0.
    """
    image_size = _check_image_size(image_size)
    max_images = _check_max_images(max_images)
    qpath, apath = Path(questions_json), Path(annotations_json)
    questions = _top_list(_read_json(qpath, "VQAv2 questions file"), "questions", qpath)
    annotations = _top_list(_read_json(apath, "VQAv2 annotations file"), "annotations", apath)
    image_dir = _require_dir(image_dir, "VQAv2 image folder")

    by_question = {}
    for i, record in enumerate(annotations):
        where = f"annotation {i}"
        question_id = _id(record, "question_id", apath, where)
        best = _field(record, "multiple_choice_answer", apath, where, str)
        raw = []
        for j, answer in enumerate(_field(record, "answers", apath, where, list)):
            raw.append(normalize_text(_field(answer, "answer", apath, f"{where} answer {j}", str)))
        by_question[question_id] = (normalize_text(best), raw)

    id_index = None if image_pattern is not None else _coco_id_index(image_dir)
    entries, entry_of = [], {}
    for i, record in enumerate(questions):
        where = f"question {i}"
        image_id = _id(record, "image_id", qpath, where)
        question = _field(record, "question", qpath, where, str)
        question_id = _id(record, "question_id", qpath, where)
        if question_id not in by_question:
            raise DispError(
                f"{apath} has no annotation for question_id {question_id!r} ({where} of {qpath}); "
                f"pass the annotations file of the same split"
            )
        entry = entry_of.get(image_id)
        if entry is None:
            if max_images is not None and len(entries) >= max_images:
                continue  # later questions may still be about images already kept
            entry = entry_of[image_id] = _Image(_vqa_image_path(image_dir, image_id, image_pattern, id_index, qpath))
            entries.append(entry)
        response, answers = by_question[question_id]
        entry.samples.append({"task": "vqa", "prompt": normalize_text(question), "response": response, "answers": answers})
    return _assemble(entries, image_size, str(qpath), {"dataset": "vqav2"})


def _vqa_image_path(image_dir: Path, image_id, pattern: Optional[str], id_index: Optional[dict], qpath: Path) -> Path:
    if pattern is not None:
        try:
            return image_dir / pattern.format(image_id=image_id)
        except (KeyError, IndexError, ValueError) as err:
            raise DispError(
                f"image_pattern {pattern!r} does not format ({_one_line(err)}); "
                f"use only {{image_id}}, e.g. 'COCO_val2014_{{image_id:012d}}.jpg'"
            ) from None
    try:
        number = int(image_id)
    except ValueError:
        raise DispError(f"{qpath}: image_id {image_id!r} is not a number; pass image_pattern to name the files") from None
    if number not in id_index:
        raise DispError(
            f"no image file ending in {number:012d}.jpg in {image_dir} (image_id {image_id} of {qpath}); "
            f"use the image folder of the same split, or pass image_pattern"
        )
    return image_dir / id_index[number]


# DAQUAR names its image at the end of the question: "what is on the desk in the image3 ?"
_DAQUAR_IMAGE = re.compile(r"\bimage(\d+)\s*\?\s*$")
# DAQUAR publishes train and test only; every DAQUAR_VAL_EVERY-th training image (in file order)
# is held out as our validation split, so train and val never share an image. The val split is also
# the attacker's fine-tuning set (disp.data.splits.load_finetune_set). With a tenth held out (80
# photos), fine-tuning on it alone, unpoisoned, cost the model a third of its accuracy; on half, the
# victim's fine-tuning adds to what the model knows (experiments/README.md, "DAQUAR").
DAQUAR_VAL_EVERY = 2


def load_daquar(qa_file, image_dir, image_size: int, max_images: Optional[int] = None,
                keep_image=None) -> VLDataset:
    """DAQUAR (Malinowski & Fritz 2014) raw question-answer files (qa.894.raw.train.txt / .test.txt).

    Lines alternate: a question that names its image at the end ("... in the image3 ?"), then its
    answer: a word, a number, or a comma-separated list ("chair, table"), kept as given. One "vqa"
    sample per pair, answers = [the answer]; the prompt is the question with "image3" written as
    "image" (the number would only let a model memorise images); the image file is
    image_dir/image3.png. Images keep the order of their first question; samples are grouped by
    image. keep_image(k) -> bool keeps only the k-th image (0-based, file order) before max_images
    applies. Line numbers in errors count from 1.
    """
    image_size = _check_image_size(image_size)
    max_images = _check_max_images(max_images)
    path = Path(qa_file)
    lines = _read_lines(path, "DAQUAR question-answer file")
    image_dir = _require_dir(image_dir, "DAQUAR image folder")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 2:
        raise DispError(f"{path} line {len(lines)} is a question with no answer line after it; the file "
                        f"should alternate question and answer lines (is it truncated?)")
    entries, entry_of, seen = [], {}, {}
    for number in range(1, len(lines), 2):
        question, answer = lines[number - 1].strip(), lines[number].strip()
        found = _DAQUAR_IMAGE.search(question)
        if found is None:
            raise DispError(f"{path} line {number} does not end in 'image<N> ?': {question[:60]!r}; "
                            f"is this a DAQUAR raw question-answer file?")
        if not answer:
            raise DispError(f"{path} line {number + 1} (the answer to line {number}) is empty")
        name = f"image{found.group(1)}.png"
        position = seen.setdefault(name, len(seen))
        if keep_image is not None and not keep_image(position):
            continue
        entry = entry_of.get(name)
        if entry is None:
            if max_images is not None and len(entries) >= max_images:
                continue
            entry = entry_of[name] = _Image(image_dir / name, f"line {number}")
            entries.append(entry)
        response = normalize_text(answer)
        entry.samples.append({"task": "vqa", "prompt": normalize_text(question[:found.start()] + "image ?"),
                              "response": response, "answers": [response]})
    return _assemble(entries, image_size, str(path), {"dataset": "daquar"})


# ---------------------------------------------------------------------------------------------
# One entry point that knows the standard layouts.
# ---------------------------------------------------------------------------------------------

PUBLIC_DATASETS = ("coco", "karpathy", "flickr", "vqav2", "daquar")
_SPLITS = ("train", "val", "test")
_FLICKR_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def _first_existing(candidates: list, what: str, root: Path, is_dir: bool = False) -> Path:
    for candidate in candidates:
        if (candidate.is_dir() if is_dir else candidate.is_file()):
            return candidate
    names = ", ".join(str(c.relative_to(root)) for c in candidates)
    raise DispError(f"no {what} under {root} (looked for {names}); put the files there or use the reader directly")


def load_public(name: str, data_root, split: str, image_size: int, max_images: Optional[int] = None) -> VLDataset:
    """Load a public dataset from its standard layout under data_root.

    split is "train", "val" or "test"; what each means per dataset:

    coco      data_root/annotations/captions_{split}2014.json + data_root/{split}2014/
              (the 2017 release, captions_{split}2017.json + {split}2017/, is used when 2014 is absent).
              train -> train2014, val -> val2014; test has no public captions: use "karpathy".
    karpathy  data_root/dataset_coco.json, dataset_flickr8k.json or dataset_flickr30k.json (exactly one)
              + images in data_root/images/ if that folder exists, else data_root/.
              For COCO, images sit at <image folder>/<filepath>/<filename>, i.e. train2014/ and val2014/.
              train -> train + restval, val -> val, test -> test (5k/5k for COCO, 1k/1k for Flickr).
    flickr    data_root/Flickr8k.token.txt (Flickr8k) or data_root/results_20130124.token (Flickr30k)
              + images in data_root/Flicker8k_Dataset/ (sic, as the official zip names it),
              Flickr8k_Dataset/, flickr30k-images/ or images/.
              train -> Flickr_8k.trainImages.txt, val -> Flickr_8k.devImages.txt,
              test -> Flickr_8k.testImages.txt. Without split files (Flickr30k has none) train takes
              every image and val/test are refused: use "karpathy" with dataset_flickr30k.json.
    vqav2     data_root/v2_OpenEnded_mscoco_{split}2014_questions.json
              + data_root/v2_mscoco_{split}2014_annotations.json + data_root/{split}2014/ (COCO images).
              train -> train2014, val -> val2014; test has no public answers: hold out part of val.
    daquar    data_root/qa.894.raw.{train,test}.txt + images in data_root/nyu_depth_images/
              (DAQUAR full, the official train / test split). val -> every 2nd image of the train
              file (DAQUAR_VAL_EVERY), which train then leaves out.
    """
    if name not in PUBLIC_DATASETS:
        raise DispError(f"unknown public dataset {name!r}; choose one of {', '.join(PUBLIC_DATASETS)}")
    if split not in _SPLITS:
        raise DispError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    _check_image_size(image_size)
    root = Path(data_root)
    if not root.is_dir():
        raise DispError(f"data root {root} does not exist or is not a folder; point it at the {name} data folder")

    if name == "coco":
        if split == "test":
            raise DispError("COCO test images have no public captions; use load_public('karpathy', ...) for a test split")
        annotations = _first_existing(
            [root / "annotations" / f"captions_{split}{year}.json" for year in ("2014", "2017")],
            "COCO captions file", root,
        )
        year = annotations.stem[-4:]  # the image folder follows the release the captions came from
        image_dir = _first_existing([root / f"{split}{year}"], "COCO image folder", root, is_dir=True)
        return load_coco_captions(annotations, image_dir, image_size, max_images)

    if name == "karpathy":
        found = sorted(p for p in root.glob("dataset_*.json") if p.is_file())
        if not found:
            raise DispError(f"no dataset_*.json under {root}; put dataset_coco.json (or a Flickr one) there")
        if len(found) > 1:
            raise DispError(
                f"several Karpathy files under {root} ({', '.join(p.name for p in found)}); "
                f"keep one per folder or call load_karpathy directly"
            )
        image_dir = root / "images" if (root / "images").is_dir() else root
        return load_karpathy(found[0], image_dir, split, image_size, max_images)

    if name == "flickr":
        tokens = _first_existing(
            [root / "Flickr8k.token.txt", root / "results_20130124.token"], "Flickr token file", root
        )
        image_dir = _first_existing(
            [root / "Flicker8k_Dataset", root / "Flickr8k_Dataset", root / "flickr30k-images", root / "images"],
            "Flickr image folder", root, is_dir=True,
        )
        split_file = root / _FLICKR_SPLIT_FILES[split]
        if split_file.is_file():
            return load_flickr_tokens(tokens, image_dir, image_size, split_file, max_images)
        if split != "train":
            raise DispError(
                f"no {split_file.name} under {root}, so there is no {split} split; "
                f"add the Flickr_8k split files, or use 'karpathy' with dataset_flickr8k/30k.json"
            )
        return load_flickr_tokens(tokens, image_dir, image_size, None, max_images)

    if name == "daquar":
        images = _first_existing([root / "nyu_depth_images", root / "images"], "DAQUAR image folder", root, is_dir=True)
        qa = _first_existing([root / f"qa.894.raw.{'test' if split == 'test' else 'train'}.txt"],
                             "DAQUAR question-answer file", root)
        keep = None
        if split != "test":
            keep = (lambda k: k % DAQUAR_VAL_EVERY == DAQUAR_VAL_EVERY - 1) if split == "val" else \
                (lambda k: k % DAQUAR_VAL_EVERY != DAQUAR_VAL_EVERY - 1)
        return load_daquar(qa, images, image_size, max_images, keep_image=keep)

    # vqav2
    if split == "test":
        raise DispError("VQAv2 test questions have no public answers; hold out part of the val split instead")
    questions = _first_existing(
        [root / f"v2_OpenEnded_mscoco_{split}2014_questions.json"], "VQAv2 questions file", root
    )
    annotations = _first_existing([root / f"v2_mscoco_{split}2014_annotations.json"], "VQAv2 annotations file", root)
    image_dir = _first_existing([root / f"{split}2014"], "VQAv2 image folder (COCO images)", root, is_dir=True)
    return load_vqav2(questions, annotations, image_dir, image_size, max_images)
