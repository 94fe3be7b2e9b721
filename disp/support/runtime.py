"""Small runtime helpers: device choice, inference precision and seeding."""

import random

import numpy as np
import torch

from disp.support.errors import DispError


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


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: str, flag: str = "--precision") -> str:
    """'fp32' or 'bf16': train.py resolves the run's --precision once and stores it in
    config.train.precision; the later stages use it unless their own --precision is given.

    auto: bf16 where this machine has fast bf16 matrix units (a CUDA GPU that supports it, or an x86
    CPU with AVX512-BF16/AMX: bench/mfu.py measures both GEMM peaks); fp32 elsewhere (most laptop
    CPUs emulate bf16 slowly; MPS).
    """
    if precision not in PRECISIONS:
        raise DispError(f"unknown {flag} '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if kind == "cpu" and _cpu_has_bf16_units() else "fp32"
    if precision == "bf16" and kind not in ("cpu", "cuda"):
        raise DispError(f"{flag} bf16 is supported on cpu and cuda, not {kind}; use {flag} fp32")
    return precision


def _cpu_has_bf16_units() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: str, precision: str):
    """Context at the resolved precision: bf16 autocast, or a no-op for fp32."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=resolve_precision(precision, device) == "bf16")
