"""Which data a run uses: the embedded scenes (default) or a public dataset on disk, as train/val/test.

Scenes are generated from the config's seed: train, val, test and the fine-tuning set (the data
the attacker poisons and DiSP purifies) use seeds seed, seed+1, seed+2, seed+3. Public data comes
from the readers in disp/data/readers.py.
"""

from disp.config import DataConfig
from disp.data.dataset import check_not_empty
from disp.data.readers import load_public
from disp.data.scenes import generate_scenes
from disp.support.errors import DispError

SOURCES = ("scenes", "coco", "karpathy", "flickr", "vqav2", "daquar")


def load_splits(cfg: DataConfig, image_size: int):
    """-> (train, val, test) VLDatasets."""
    if cfg.source not in SOURCES:
        raise DispError(f"unknown --data '{cfg.source}'; choose one of: {', '.join(SOURCES)}")
    if cfg.source == "scenes":
        if image_size != 48:
            raise DispError(f"the scene generator renders 48 px images, but the model expects {image_size} px")
        return tuple(
            generate_scenes(n, cfg.seed + offset, cfg.questions_per_image)
            for offset, n in enumerate([cfg.train_images, cfg.val_images, cfg.test_images])
        )
    if not cfg.data_root:
        raise DispError(f"--data {cfg.source} needs --data-root pointing at the dataset folder")
    # COCO and VQAv2 publish no test answers: their val split doubles as the test split
    # (use --data karpathy for the standard COCO caption test split).
    test_split = "val" if cfg.source in ("coco", "vqav2") else "test"
    limits = {"train": (cfg.train_images, "train"), "val": (cfg.val_images, "val"), "test": (cfg.test_images, test_split)}
    return tuple(
        check_not_empty(load_public(cfg.source, cfg.data_root, split, image_size, max_images=limit),
                        f"{cfg.source} {split} split under {cfg.data_root}")
        for limit, split in limits.values()
    )


def load_finetune_set(cfg: DataConfig, image_size: int):
    """The fine-tuning set of the attack/defence stages: fresh scenes, or the public train split's head."""
    if cfg.source == "scenes":
        return generate_scenes(cfg.finetune_images, cfg.seed + 3, cfg.questions_per_image)
    return check_not_empty(load_public(cfg.source, cfg.data_root, "train", image_size, max_images=cfg.finetune_images),
                           f"{cfg.source} train split under {cfg.data_root}")
