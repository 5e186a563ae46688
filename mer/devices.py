"""Devices: one parser for `--device`, and the settings that make training reproducible on it.

`parse_device` checks a device string once, before anything is written, and never initialises
CUDA: it counts GPUs through NVML (`torch.cuda.device_count`), so a process may still fork
workers afterwards ("Cannot re-initialize CUDA in forked subprocess" otherwise).
"""

from __future__ import annotations

import os
import re
import sys

from .errors import UserError

_CUDA = re.compile(r"cuda(?::(\d+))?")


def cuda_count() -> int:
    """GPUs torch can use, counted without initialising CUDA (0 for a CPU build)."""
    import torch

    return torch.cuda.device_count() if torch.backends.cuda.is_built() else 0


def is_cuda(text: str) -> bool:
    """Whether `text` is a well-formed CUDA device string ('cuda' or 'cuda:N')."""
    return _CUDA.fullmatch(str(text).strip().lower()) is not None


def parse_device(text: str) -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device string torch accepts, checked against this
    machine ('auto': cuda when a GPU is visible, else cpu)."""
    name = str(text).strip().lower()
    if name == "auto":
        return "cuda" if cuda_count() > 0 else "cpu"
    if name == "cpu":
        return "cpu"
    m = _CUDA.fullmatch(name)
    if not m:
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N (one GPU index), got '{text}'")
    n = cuda_count()
    if n == 0:
        raise UserError(f"--device {text}: torch sees no CUDA device (a CPU build of torch, no driver, or "
                        "CUDA_VISIBLE_DEVICES empty); install a CUDA build of torch (see README) or use --device cpu")
    if m.group(1) is not None and int(m.group(1)) >= n:
        have = ", ".join(f"cuda:{i}" for i in range(n))
        raise UserError(f"--device {text}: this machine has {n} CUDA device(s) ({have})")
    return name


def jobs_that_fit(device: str, job_mb: float) -> int:
    """Processes that fit side by side on the GPU `device`, each using `job_mb` (80% of its free
    memory now), at most one per CPU core. This initialises CUDA in the calling process: call it
    only where the workers are spawned, not forked."""
    import logging

    import torch

    from .cli import cpu_count

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    n = min(max(1, int(0.8 * free / (job_mb * 2**20))), cpu_count())
    logging.getLogger("mer").info("%.1f GB free on %s: %d process(es) at %g MB each", free / 2**30, device, n, job_mb)
    return n


def describe_device_error(e: BaseException, device: str) -> str | None:
    """A one-line explanation if `e` is a device problem (out of memory, busy or missing GPU),
    else None: so that a GPU problem is never reported as a broken model."""
    text = f"{type(e).__name__}: {e}"
    low = text.lower()
    if "out of memory" in low:
        return (f"{device} ran out of memory ({text.splitlines()[0][:200]}); free the GPU, use fewer --jobs, "
                "or --device cpu")
    markers = ("cuda", "cudnn", "cublas", "device-side", "no kernel image", "busy or unavailable", "invalid device")
    if device != "cpu" and any(m in low for m in markers):
        return f"device {device} failed ({text.splitlines()[0][:200]}); check the GPU or use --device cpu"
    return None


def set_deterministic(device: str, on: bool) -> None:
    """Deterministic kernels (bit-identical reruns and resumes) or the fastest ones.

    On CUDA this sets torch.use_deterministic_algorithms, cuDNN's deterministic mode (and no
    autotuning) and the cuBLAS workspace that deterministic matmuls need; the models avoid the
    kernels that have no deterministic backward (see mer.models)."""
    import torch

    from . import models

    if on and device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    models.MATH_ATTENTION = bool(on) and device.startswith("cuda")
    try:  # the kernels' switch without importing the compiler (2 s per process), which nothing here uses
        if "torch._inductor" in sys.modules:  # compiled code would read the compiler's own flag too
            raise AttributeError
        torch._C._set_deterministic_algorithms(bool(on), warn_only=False)
    except (AttributeError, TypeError):  # or when a torch version moves the private call
        torch.use_deterministic_algorithms(bool(on))
    torch.backends.cudnn.deterministic = bool(on)
    torch.backends.cudnn.benchmark = not on and device.startswith("cuda")


def deterministic_for(setting: object, device: str) -> bool:
    """train.deterministic: auto (on for CPU, off on CUDA: faster kernels) | true | false."""
    if setting == "auto":
        return not device.startswith("cuda")
    if isinstance(setting, bool):
        return setting
    raise UserError(f"train.deterministic must be auto, true or false, got '{setting}'")
