"""Which data a run uses: the embedded scenes (default) or a public dataset on disk, as train/val/test.

Scenes are generated from the config's seed: train, val, test and the fine-tuning set (the data
the attacker poisons and DiSP purifies) use seeds seed, seed+1, seed+2, seed+3. Public data comes
from the readers in disp/data/readers.py; its fine-tuning set never shares an image with the clean
model's training set or the test set (load_finetune_set).
"""

from disp.config import DataConfig
from disp.data.dataset import check_not_empty, drop_first_images, one_sample_per_prompt
from disp.data.readers import load_public
from disp.data.scenes import generate_scenes
from disp.support.errors import DispError, check_choice

SOURCES = ("scenes", "coco", "karpathy", "flickr", "vqav2", "daquar")
# public datasets without test answers, whose val split serves as the test split
VAL_IS_TEST = ("coco", "vqav2")


SPLITS = ("train", "val", "test")


def load_split(cfg: DataConfig, image_size: int, split: str):
    """One of the run's train / val / test splits, as a VLDataset (a stage loads only what it needs)."""
    check_choice("--data", cfg.source, SOURCES)
    check_choice("split", split, SPLITS)
    limit = {"train": cfg.train_images, "val": cfg.val_images, "test": cfg.test_images}[split]
    if cfg.source == "scenes":
        if image_size != 48:
            raise DispError(f"the scene generator renders 48 px images, but the model expects {image_size} px")
        return generate_scenes(limit, cfg.seed + SPLITS.index(split), cfg.questions_per_image)
    if not cfg.data_root:
        raise DispError(f"--data {cfg.source} needs --data-root pointing at the dataset folder")
    # COCO and VQAv2 publish no test answers: their val split doubles as the test split
    # (use --data karpathy for the standard COCO caption test split).
    public = "val" if split == "test" and cfg.source in VAL_IS_TEST else split
    data = check_not_empty(load_public(cfg.source, cfg.data_root, public, image_size, max_images=limit),
                           f"{cfg.source} {split} split under {cfg.data_root}")
    # training uses every caption of an image; evaluation generates once per image and prompt
    return data if split == "train" else one_sample_per_prompt(data)


def load_splits(cfg: DataConfig, image_size: int):
    """-> (train, val, test) VLDatasets."""
    return tuple(load_split(cfg, image_size, split) for split in SPLITS)


def load_finetune_set(cfg: DataConfig, image_size: int):
    """The fine-tuning set of the attack and purification stages: never an image the clean model
    trained on, nor a test image. Scenes: fresh ones (seed + 3). Public data: the val split (Flickr8k's
    dev images, Karpathy's val, DAQUAR's held-out half), or, where val is the test split (COCO,
    VQAv2), the training images after the clean model's first train_images."""
    if cfg.source == "scenes":
        return generate_scenes(cfg.finetune_images, cfg.seed + 3, cfg.questions_per_image)
    where = f"{cfg.source} data under {cfg.data_root}"
    if cfg.source in VAL_IS_TEST:
        train = load_public(cfg.source, cfg.data_root, "train", image_size,
                            max_images=cfg.train_images + cfg.finetune_images)
        return check_not_empty(drop_first_images(train, cfg.train_images),
                               f"the training images after the first {cfg.train_images} of the {where}")
    return check_not_empty(load_public(cfg.source, cfg.data_root, "val", image_size, max_images=cfg.finetune_images),
                           f"the val split of the {where}")
