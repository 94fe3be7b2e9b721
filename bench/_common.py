"""Shared helpers of the benchmarks: paths, machine description, GEMM peaks, precision, timing, JSON.

Every bench script imports this first; it puts the repository root on sys.path so that
`python bench/<name>.py` works from the root without installing the package.
"""

import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from disp.support.files import write_json  # noqa: E402
from disp.support.errors import DispError  # noqa: E402
from disp.support.runtime import autocast, pick_device  # noqa: E402, F401 (re-exported for the scripts)

PRECISION_CHOICES = ("fp32", "bf16", "both")


def add_common_options(parser, name: str):
    """--precision, --device and --out, the same in every bench script that measures precisions."""
    parser.add_argument("--precision", default="both", help="fp32 | bf16 | both (default: both, side by side)")
    parser.add_argument("--device", default="cpu", help="cpu (default) | cuda | auto")
    parser.add_argument("--out", default=None, help=f"JSON path (default: bench/results/{name}.json)")


def precisions(choice: str):
    """--precision fp32|bf16|both -> the list of precisions to measure, side by side."""
    if choice not in PRECISION_CHOICES:
        raise DispError(f"unknown --precision '{choice}'; choose one of: {', '.join(PRECISION_CHOICES)}")
    return ["fp32", "bf16"] if choice == "both" else [choice]


def sync(device: str):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def machine() -> dict:
    """What ran the benchmark (the numbers only compare on the same machine)."""
    cpu = platform.processor() or platform.machine()
    flags = []
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
        flag_line = next((line for line in lines if line.startswith("flags")), "")
        flags = [f for f in flag_line.split() if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2"))]
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": sorted(flags), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(info: dict) -> str:
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (f"{info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads, "
            f"{info['cpu_capability']}, {' '.join(info['flags'])}){gpu}, torch {info['torch']}")


def gemm_peak(dtype, device="cpu", n=2048, repeats=6) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matmul in `dtype` (one warm-up first)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def best_time(fn, repeats, device):
    """(result, seconds): the fastest of `repeats` calls of fn()."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return out, best


def save_results(name: str, data: dict, out=None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    write_json(path, data)
    return path


def table(header, rows) -> str:
    """A markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def require(path: Path, what: str) -> Path:
    if not Path(path).exists():
        raise DispError(f"{path} does not exist ({what}); run the pipeline first (bash run.sh) or pass --run-dir")
    return Path(path)


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
