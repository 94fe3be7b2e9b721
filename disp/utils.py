"""Small runtime helpers: device choice and seeding."""

import random

import numpy as np
import torch

from disp.errors import DispError


def pick_device(name: str = "auto") -> str:
    """auto: cuda > mps > cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise DispError(f"unknown --device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DispError("--device cuda was asked for, but no CUDA GPU is visible; use --device cpu")
    return name


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
