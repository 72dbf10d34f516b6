"""The one place that chooses the computation path.

Paths:

- ``"triton"``: the fused Triton kernels (``fastdml.kernels``). The automatic choice for CUDA tensors.
  Forced on CPU tensors it runs under ``TRITON_INTERPRET=1`` (tests).
- ``"blocked"``: the memory-bounded PyTorch path (``fastdml.blocked``). The automatic choice for CPU tensors.
- ``"reference"``: the materializing oracle (``fastdml.reference``), on request only.

The choice is ``"auto"`` unless overridden by the environment variable ``FASTDML_BACKEND``
(``auto|triton|blocked|reference``) or, innermost first, by the :func:`use_backend` context manager.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

BACKENDS = ("auto", "triton", "blocked", "reference")
_local = threading.local()


def _stack() -> list[str]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _check(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for: the innermost ``use_backend``, else ``FASTDML_BACKEND``, else ``"auto"``."""
    stack = _stack()
    if stack:
        return stack[-1]
    return _check(os.environ.get("FASTDML_BACKEND", "auto").strip().lower() or "auto", "FASTDML_BACKEND")


@contextlib.contextmanager
def use_backend(name: str):
    """Force a path inside a ``with`` block: ``with fastdml.use_backend("reference"): ...``."""
    _stack().append(_check(name, "use_backend(name)"))
    try:
        yield
    finally:
        _stack().pop()


def triton_available() -> bool:
    """True when Triton imports (on the CPU this means the interpreter can run the kernels)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def backend_for(tensor: torch.Tensor) -> str:
    """The path used for an op whose main input is ``tensor``: ``"triton"``, ``"blocked"`` or ``"reference"``."""
    name = requested_backend()
    if tensor.dim() == 2 and tensor.shape[1] == 0:
        return "reference"  # D = 0: every distance is 0; the oracle gives PML's values, nothing to fuse
    if name == "auto":
        if tensor.is_cuda and triton_available():
            return "triton"
        if tensor.device.type == "cpu":
            return "blocked"
        # other devices (mps, xpu, ...): the blocked path is plain PyTorch and runs anywhere
        return "blocked"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("FASTDML_BACKEND/use_backend asked for 'triton' but triton is not importable")
        if tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "the 'triton' backend on CPU tensors needs TRITON_INTERPRET=1 set before fastdml.kernels is imported"
            )
    return name
