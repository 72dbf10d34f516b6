"""What this machine has and which path fastdml takes on it: versions, devices, the device table.

Read by ``python -m fastdml`` (the first lines of its report) and by anyone filing a bug::

    >>> import fastdml.info
    >>> fastdml.info.versions()["torch"]
    '2.13.0+cpu'

The device table (also ``docs/devices.md``) is the routing rule of :func:`fastdml.dispatch.backend_for` in
words; :func:`path_for` says which row applies to a device of this machine and why.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
from typing import Optional

import torch

# (device, condition, path, fp32 precision, status): the rows of docs/devices.md
DEVICE_TABLE = (
    (
        "NVIDIA GPU (CUDA)",
        "`tensor.is_cuda`, `torch.version.hip` is None, Triton importable",
        "triton",
        "`fastdml.config` setting (ieee by default)",
        "tested under the Triton interpreter in CI; no GPU run has passed yet",
    ),
    (
        "AMD GPU (ROCm)",
        "`tensor.is_cuda` (true on ROCm too), `torch.version.hip` set, Triton importable",
        "triton",
        "ieee always",
        "untested",
    ),
    (
        "CUDA or ROCm without Triton",
        "`tensor.is_cuda`, Triton not importable",
        "blocked",
        "torch's matmul setting",
        "the CPU-tested code on another device; untested there",
    ),
    ("CPU", "`tensor.device.type == 'cpu'`", "blocked (+ compiled C helpers)", "ieee", "tested in CI"),
    ("MPS, XPU and other devices", "any other device type", "blocked", "torch's matmul setting", "untested"),
)
NOTES = (
    "float64 tensors on the triton path run on the blocked path (the kernels take fp16, bf16 and fp32).",
    "`FASTDML_BACKEND=triton|blocked|reference` or `with fastdml.use_backend(...)` overrides the choice.",
)


def _module_version(name: str) -> Optional[str]:
    try:
        return getattr(importlib.import_module(name), "__version__", "?")
    except Exception:
        return None


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    """fastdml, Python, torch, CUDA/ROCm, driver, Triton, numpy, PML, the CPU and every visible GPU."""
    import fastdml

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {"index": i, "name": p.name, "memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}"}
            )
    return {
        "fastdml": fastdml.__version__,
        "fastdml_path": os.path.dirname(os.path.abspath(fastdml.__file__)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "driver": _nvidia_driver() if torch.cuda.is_available() else None,
        "triton": _module_version("triton"),
        "numpy": _module_version("numpy"),
        "pytorch_metric_learning": _module_version("pytorch_metric_learning"),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }


def available_devices() -> list[str]:
    """The devices of this machine that fastdml can be checked on: ``cpu``, then ``cuda`` if present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def native_status() -> str:
    """The blocked path's compiled helpers: ``on``, ``off: ...`` or ``unavailable: ...``."""
    try:
        from fastdml.blocked import native
    except Exception as exc:  # reported, never fatal: the torch ops are the fallback
        return f"unavailable: {type(exc).__name__}: {exc}"
    return native.status()


def fp32_precision() -> str:
    """The fp32 matmul precision the kernels use (``fastdml.config.fp32_precision()``; ``ieee`` where the
    setting does not exist)."""
    from fastdml import config

    getter = getattr(config, "fp32_precision", None)
    return "ieee" if getter is None else str(getter())


def path_for(device: str | torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """Which path fastdml takes for a ``dtype`` tensor on ``device`` and why: ``backend`` (dispatch's
    answer), ``row`` (the device table's row), ``why``, ``native`` (compiled helpers, blocked path) and
    ``fp32_precision`` (triton path, fp32)."""
    from fastdml import dispatch

    device = torch.device(device)
    probe = torch.empty(0, dtype=dtype, device=device)
    backend = dispatch.backend_for(probe)
    requested = dispatch.requested_backend()
    is_rocm = device.type == "cuda" and getattr(torch.version, "hip", None) is not None
    triton = dispatch.triton_available()
    if requested != "auto":
        row, why = "override", f"FASTDML_BACKEND / use_backend asks for {requested!r}"
    elif device.type == "cuda" and triton:
        row = "AMD GPU (ROCm)" if is_rocm else "NVIDIA GPU (CUDA)"
        why = f"{'ROCm' if is_rocm else 'CUDA'} tensor and Triton {_module_version('triton')} imports"
    elif device.type == "cuda":
        row, why = "CUDA or ROCm without Triton", "CUDA tensor but Triton does not import"
    elif device.type == "cpu":
        row, why = "CPU", "CPU tensor"
    else:
        row, why = "MPS, XPU and other devices", f"{device.type} tensor: the blocked path is plain PyTorch"
    effective = backend
    if backend == "triton" and dtype == torch.float64:
        effective, why = "blocked", why + "; float64 runs on the blocked path"
    if backend == "triton" and device.type == "cpu":
        why += " (Triton interpreter)"
    out = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "backend": effective, "row": row}
    out["why"] = why
    out["native"] = native_status() if effective == "blocked" and device.type == "cpu" else None
    if effective == "triton":  # on ROCm the kernels compute ieee whatever the setting says
        out["fp32_precision"] = "ieee (ROCm)" if is_rocm else fp32_precision()
    else:  # the blocked path's GEMMs follow torch's setting ("highest": ieee)
        out["fp32_precision"] = f"torch.get_float32_matmul_precision() = {torch.get_float32_matmul_precision()!r}"
    return out


def device_table_markdown() -> str:
    """The device table as markdown (docs/devices.md holds the same)."""
    lines = ["| device | when | path | fp32 precision | status |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in DEVICE_TABLE]
    return "\n".join(lines + [""] + [f"- {n}" for n in NOTES])


if __name__ == "__main__":  # pragma: no cover - convenience
    import json

    json.dump(versions(), sys.stdout, indent=1)
