"""The embedded default data: Sort-of-CLEVR-style scenes, rendered with numpy, deterministic by seed.

After Santoro et al. 2017 ("A simple neural network module for relational reasoning"): coloured
shapes on a plain canvas, with non-relational and relational questions answered from a small
vocabulary. Our choices, made for learnability on a CPU and for the backdoor experiments:

- 48x48 px, white canvas, 3 objects of radius 7 px, each in its own column of a 3x3 grid of
  16 px cells (so "left to right" is never ambiguous) and a random row. With 8 px ViT patches an
  object spans 2x2 to 3x3 of the 36 vision tokens, so a one-patch trigger competes with content
  spread over several tokens.
- 6 colours (each used at most once per image), 3 shapes (circle, square, triangle).
- Captions list the objects left to right; three phrasings per image serve as CIDEr references,
  the first one is the training target.
- Questions (task name -> example):
    color     what color is the circle ? / what color is the left object ?   (a shape only if unique)
    shape     what shape is the middle object ?
    position  where is the circle ?                       left | middle | right (if unique)
    count     how many circles are there ?                0 .. 3
    nearest   what shape is nearest to the left object ?  (relational; asked if unambiguous)
    same      how many others have the same shape as the right object ?   (relational)
- Per-patch labels (colour class, shape class of the object covering most of the patch, 0 for
  background) for the vision-encoder pretraining phase.
"""

import numpy as np
import torch

from disp.data.dataset import CAPTION_PROMPT, VLDataset

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 190),
    "orange": (255, 130, 0),
}
SHAPES = ["circle", "square", "triangle"]
COLUMNS = ["left", "middle", "right"]
IMAGE_SIZE, CELL, RADIUS, PATCH = 48, 16, 7, 8
N_OBJECTS = 3


def random_scene(rng: np.random.Generator) -> list:
    """Three objects: dicts with color, shape, column, x, y (pixel centre)."""
    colors = rng.choice(list(COLORS), size=N_OBJECTS, replace=False)
    rows = rng.integers(0, 3, size=N_OBJECTS)
    objects = []
    for column in range(N_OBJECTS):
        jitter = rng.integers(-1, 2, size=2)
        objects.append({
            "color": str(colors[column]),
            "shape": SHAPES[rng.integers(0, len(SHAPES))],
            "column": column,
            "x": column * CELL + CELL // 2 + int(jitter[0]),
            "y": int(rows[column]) * CELL + CELL // 2 + int(jitter[1]),
        })
    return objects


def object_mask(obj: dict) -> np.ndarray:
    """(H, W) bool: the pixels the object covers."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    dx, dy = xs - obj["x"], ys - obj["y"]
    if obj["shape"] == "circle":
        return dx**2 + dy**2 <= RADIUS**2
    if obj["shape"] == "square":
        return (np.abs(dx) <= RADIUS - 1) & (np.abs(dy) <= RADIUS - 1)
    # triangle pointing up: apex at the top, base at the bottom, same height and width
    height = dy + RADIUS  # 0 at the apex, 2R at the base
    return (height >= 0) & (height <= 2 * RADIUS) & (np.abs(dx) <= height / 2)


def render(objects: list):
    """-> image (3, H, W) uint8 and patch labels (n_patches, 2) long: (colour class, shape class)."""
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, dtype=np.uint8)
    n_side = IMAGE_SIZE // PATCH
    coverage = np.zeros((len(objects), n_side, n_side))
    for k, obj in enumerate(objects):
        mask = object_mask(obj)
        image[mask] = COLORS[obj["color"]]
        coverage[k] = mask.reshape(n_side, PATCH, n_side, PATCH).mean(axis=(1, 3))
    labels = np.zeros((n_side, n_side, 2), dtype=np.int64)
    best = coverage.argmax(axis=0)
    covered = coverage.max(axis=0) >= 0.25  # a patch shows an object if a quarter of it is that object
    color_ids = np.array([1 + list(COLORS).index(o["color"]) for o in objects])
    shape_ids = np.array([1 + SHAPES.index(o["shape"]) for o in objects])
    labels[..., 0] = np.where(covered, color_ids[best], 0)
    labels[..., 1] = np.where(covered, shape_ids[best], 0)
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(labels.reshape(-1, 2))


def captions(objects: list) -> list:
    """Three phrasings of the same left-to-right listing; the first is the training target."""
    names = [f"{o['color']} {o['shape']}" for o in objects]
    listed = f"a {names[0]} , a {names[1]} and a {names[2]}"
    return [
        listed,
        f"from left to right : {names[0]} , {names[1]} , {names[2]}",
        f"there are three objects : {listed}",
    ]


def questions(objects: list) -> list:
    """All well-posed (task, question, answer) triples for a scene.

    Objects are referred to by column or by a unique shape, never by colour: in probes the text
    model learned colour-keyed look-ups ("where is the red object ?") far too slowly (still at
    chance after 3,000 steps, while shape- and position-keyed questions reached 100%).
    """
    out = []
    shape_counts = {s: sum(o["shape"] == s for o in objects) for s in SHAPES}
    for o in objects:
        where = COLUMNS[o["column"]]
        if shape_counts[o["shape"]] == 1:
            out.append(("color", f"what color is the {o['shape']} ?", o["color"]))
            out.append(("position", f"where is the {o['shape']} ?", where))
        out.append(("shape", f"what shape is the {where} object ?", o["shape"]))
        out.append(("color", f"what color is the {where} object ?", o["color"]))
        out.append(("same", f"how many others have the same shape as the {where} object ?",
                    str(shape_counts[o["shape"]] - 1)))
        others = sorted((np.hypot(p["x"] - o["x"], p["y"] - o["y"]), p["shape"]) for p in objects if p is not o)
        if others[1][0] - others[0][0] >= 3:  # only when the nearest object is clearly nearest
            out.append(("nearest", f"what shape is nearest to the {where} object ?", others[0][1]))
    for s in SHAPES:
        out.append(("count", f"how many {s}s are there ?", str(shape_counts[s])))
    return out


def generate_scenes(n_images: int, seed: int, questions_per_image: int) -> VLDataset:
    """n_images scenes -> a caption sample plus `questions_per_image` VQA samples per image.

    Questions are drawn task-first (uniform over the tasks the scene allows, then a question of
    that task) so every task is well represented.
    """
    rng = np.random.default_rng(seed)
    images, labels, samples = [], [], []
    for index in range(n_images):
        objects = random_scene(rng)
        image, patch_labels = render(objects)
        images.append(image)
        labels.append(patch_labels)
        refs = captions(objects)
        samples.append({"image": index, "task": "caption", "prompt": CAPTION_PROMPT,
                        "response": refs[0], "answers": refs})
        by_task = {}
        for task, question, answer in questions(objects):
            by_task.setdefault(task, []).append((question, answer))
        tasks = sorted(by_task)
        chosen = rng.choice(len(tasks), size=min(questions_per_image, len(tasks)), replace=False)
        for t in sorted(chosen):
            question, answer = by_task[tasks[t]][rng.integers(0, len(by_task[tasks[t]]))]
            samples.append({"image": index, "task": tasks[t], "prompt": question,
                            "response": answer, "answers": [answer]})
    return VLDataset(
        images=torch.stack(images),
        samples=samples,
        patch_labels=torch.stack(labels),
        meta={"source": "scenes", "seed": seed, "patch_classes": [1 + len(COLORS), 1 + len(SHAPES)]},
    )
