"""Every routing rule of fastdml: which implementation runs an op.

The requested backend is ``"auto"`` unless ``FASTDML_BACKEND`` (``auto|triton|blocked|reference``) or, innermost
first, the :func:`use_backend` context manager says otherwise. From it and the op's main input ``x``:

=====================================  ==================================================================
situation                              what runs
=====================================  ==================================================================
auto, CUDA tensor, Triton importable   ``triton``: the fused kernels (``fastdml.kernels``)
auto, any other device                 ``blocked``: the memory-bounded torch path (``fastdml.blocked``)
``triton`` forced on a CPU tensor      the kernels under ``TRITON_INTERPRET=1`` (an error without it)
``reference`` requested, eager         :mod:`fastdml.reference`, called directly with plain autograd
``reference`` requested, compiled      ``blocked``: a traced call always goes through the custom ops
float64 on ``triton``                  ``blocked`` (the kernels take fp16/bf16/fp32 only)
``pair_values``, ``chosen_triplet``    ``fastdml.portable`` on every device (O(T D) row gathers)
NaN, inf or overflowing ``x``/``r``   :mod:`fastdml.reference` (PML's NaN rule): eagerly for every op, inside
                                       a compiled blocked or Triton op too (:func:`stats_from_reference`;
                                       mechanism in ``blocked/nonfinite.py``)
D = 0                                  :mod:`fastdml.reference` (every distance is 0: PML's values)
CPU, float32/float64 rows, blocked     the compiled C helpers, unless switched off (``FASTDML_NATIVE=0``,
  batch-hard scans, chosen triplets,   ``native.disabled()``) or not built: :func:`native_helpers`
  the square contrastive tile
square contrastive, D <= 4, blocked,   one dense pass over the (N, N) matrix by direct differences (no tiles,
  N <= 384, within the memory budget   no near-duplicates taken apart): :func:`contrastive_dense_sweep`
a miner on float16 CPU embeddings      the distance object's matrix, compared in float16 (PML's algorithm and
  (``triton`` not forced)              arithmetic, so PML's picks): :func:`miner_on_matrix`
square contrastive gradient, Triton    upper triangle, transposed half added with atomics; the row-owned full
                                       square (bitwise repeatable) under ``torch.use_deterministic_algorithms``:
                                       :func:`kernel_atomics`
=====================================  ==================================================================
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading

import torch

BACKENDS = ("auto", "triton", "blocked", "reference")
_local = threading.local()

# ops whose one implementation is plain torch code on every device (no sweep to fuse)
_PORTABLE = {"pair_values", "pair_values_backward", "chosen_triplet_stats_fwd"}


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
        # blocked is plain PyTorch: the CPU path, and the fallback on every other device (mps, xpu, ...)
        return "triton" if tensor.is_cuda and triton_available() else "blocked"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("FASTDML_BACKEND/use_backend asked for 'triton' but triton is not importable")
        if tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "the 'triton' backend on CPU tensors needs TRITON_INTERPRET=1 set before fastdml.kernels is imported"
            )
    return name


def use_reference(x: torch.Tensor, r: torch.Tensor | None = None) -> bool:
    """Whether an eager op on ``x`` (and ``r``) calls :mod:`fastdml.reference` directly: the reference was
    requested, or a row is NaN, infinite or large enough to overflow a distance (:func:`stats_from_reference`).
    Never while torch.compile traces: a compiled call always goes through the custom ops."""
    if torch.compiler.is_compiling():
        return False
    return backend_for(x) == "reference" or stats_from_reference(x, r)


def module_for(x: torch.Tensor):
    """The module that implements the backend contract for ``x`` inside a custom op: ``fastdml.kernels`` or
    ``fastdml.blocked`` (float64 on the kernels, and the reference inside a compiled graph, run blocked)."""
    if backend_for(x) == "triton":
        kernels = importlib.import_module("fastdml.kernels")
        if x.dtype != torch.float64 or getattr(kernels, "SUPPORTS_FLOAT64", False):
            return kernels
    return importlib.import_module("fastdml.blocked")


def implementation(x: torch.Tensor, name: str):
    """The function that runs backend entry point ``name`` (``contrastive_stats_fwd``, ``row_hardest``, ...)
    for an op whose main input is ``x``."""
    module = importlib.import_module("fastdml.portable") if name in _PORTABLE else module_for(x)
    fn = getattr(module, name, None)
    if fn is None:
        raise NotImplementedError(f"{module.__name__} does not implement {name}; use FASTDML_BACKEND=reference")
    if module.__name__ == "fastdml.kernels":
        fn = _kernel_with_nan_rule(name, fn)
    return fn


_GUARDED: dict = {}


def _kernel_with_nan_rule(name: str, fn):
    """``fn`` wrapped so that NaN, inf or overflowing input gets the reference's results (PML's rule), as the
    blocked ops are: a compiled graph reaches the kernels without the eager check of :func:`use_reference`."""
    if (name, fn) not in _GUARDED:
        from .blocked import nonfinite

        if name.endswith("_stats_fwd"):
            wrapped = nonfinite.reference_stats_if_nonfinite(name[: -len("_fwd")])(fn)
        elif name in ("row_hardest", "row_extreme", "triplet_list", "pair_list"):
            wrapped = nonfinite.reference_mining_if_nonfinite(name)(fn)
        else:
            wrapped = fn
        _GUARDED[(name, fn)] = wrapped
    return _GUARDED[(name, fn)]


def stats_from_reference(x: torch.Tensor, r: torch.Tensor | None) -> bool:
    """Whether an op takes PML's arithmetic from the reference (eagerly by :func:`use_reference`, inside a
    compiled blocked op by ``blocked/nonfinite.py``): ``x`` or ``r`` holds a NaN or an infinity, or entries
    large enough that a squared distance can overflow (``fastdml._nanrule.extreme``), or D = 0. The fused sweeps mask by
    interval arithmetic, which NaN defeats; the reference follows PML's comparisons exactly."""
    from . import _nanrule

    return (x.dim() == 2 and x.shape[1] == 0) or _nanrule.extreme(x, r)


def native_helpers(device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Whether the blocked path may call the compiled C helpers (``fastdml.blocked.native``) for tensors on
    ``device`` of ``dtype``: CPU, float32/float64, and native's own switch on (its build, ``FASTDML_NATIVE``)."""
    if device.type != "cpu" or (dtype is not None and dtype not in (torch.float32, torch.float64)):
        return False
    from .blocked import native

    return native.enabled()


# largest N of the dense square contrastive pass: it computes all N^2 pairs where the tiles take half and skip
# inactive ones, so above a few hundred rows the tiles are faster (bench/RESULTS.md)
DENSE_SWEEP_MAX_N = 384


def dense_sweep_bytes(n: int, esize: int) -> int:
    """Peak working memory of the dense square contrastive pass: six (n, n) buffers of ``esize`` bytes and two
    boolean masks, ``(6 esize + 2) n^2``."""
    return (6 * esize + 2) * n * n


def contrastive_dense_sweep(direct: bool, n: int, esize: int, fixed: int) -> bool:
    """Whether the blocked path takes a square contrastive problem of ``n`` rows in one dense pass (direct
    differences, gradient included) instead of its tile sweeps: small D (``direct``), ``n <=
    DENSE_SWEEP_MAX_N``, and ``dense_sweep_bytes(n, esize) + fixed <= budget`` (``fixed``: the bytes of the
    gradient parts)."""
    from .blocked import budget

    return direct and n <= DENSE_SWEEP_MAX_N and dense_sweep_bytes(n, esize) + int(fixed) <= budget.budget_bytes()


def miner_on_matrix(x: torch.Tensor) -> bool:
    """Whether a miner selects on its distance object's matrix in ``x``'s dtype (PML's algorithm and float16
    comparisons) instead of the fused fp32-accumulating sweeps: float16 embeddings on the CPU, unless the
    kernels are forced. Margins on an 11-bit grid often tie exactly, so only PML's own arithmetic gives PML's
    picks (the losses stay fp32-accumulated)."""
    return x.dtype == torch.float16 and x.device.type == "cpu" and requested_backend() != "triton"


# --- Triton kernels: atomics (used by kernels/contrastive.py) -----------------------------------------------
def kernel_atomics() -> bool:
    """Whether a Triton kernel may add partial results with atomics (order-dependent fp32 sums, not bitwise
    repeatable): True unless ``torch.use_deterministic_algorithms(True)`` is in force, like PyTorch's own
    atomics-based CUDA ops. The square contrastive gradient then sweeps the upper triangle only (half the
    distance work) and adds the transposed half atomically; otherwise it sweeps the full square, row-owned."""
    return not torch.are_deterministic_algorithms_enabled()
