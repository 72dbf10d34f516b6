"""The benchmark cases: what is timed, on what inputs, and what each baseline is predicted to cost.

A case is one (family, variant, implementation, mode, N, D, dtype, label pattern, device):

- **family** (one bench file each) and **variant** (the call):

  ============  =======================  ==============================================================
  family        variant id               call
  ============  =======================  ==============================================================
  contrastive   ContrastiveLoss          ``losses.ContrastiveLoss()(x, y)``
  batch_hard    TML_BatchHardMiner       ``losses.TripletMarginLoss()(x, y, miners.BatchHardMiner()(x, y))``
  batch_hard    BatchHardTripletLoss     ``losses.BatchHardTripletLoss()(x, y)`` (fastdml only)
  all_triplets  TripletMarginLoss        ``losses.TripletMarginLoss()(x, y)`` (all triplets)
  all_triplets  BatchAllTripletLoss      ``losses.BatchAllTripletLoss()(x, y)`` (fastdml only)
  semihard      TML_SemihardMiner        ``losses.TripletMarginLoss()(x, y, miners.TripletMarginMiner(
                                         type_of_triplets="semihard")(x, y))``
  semihard      SemiHardTripletLoss      ``losses.SemiHardTripletLoss()(x, y)`` (fastdml only)
  ============  =======================  ==============================================================

- **implementation**: ``fastdml`` (the automatic path through the drop-in API), ``reference`` (the same API
  under ``fastdml.use_backend("reference")``: the materializing oracle), ``pml`` (pytorch-metric-learning's
  identical call; drop-in variants only) and, on CUDA, ``blocked`` (``use_backend("blocked")``).
- **mode**: ``fwdbwd`` (loss and ``loss.backward()``) or ``fwd`` (the loss alone, with grad enabled, as in a
  training step).
- **labels**: ``random10`` (10 classes drawn uniformly) or ``pk4`` (N/4 classes of 4 samples each, as a
  P x K sampler yields them).

Baselines that cannot run a size are not run: :func:`predict` gives a case's peak memory and time per call
from the formulas below, and a case predicted over the memory limit or over :data:`TIME_LIMIT_S` is
recorded as skipped with its prediction. The time coefficients are one CPU's; ``python -m bench.calibrate``
re-derives them on another machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import math
import os
import platform
import subprocess
from collections.abc import Callable

import torch

FAMILIES = ("contrastive", "batch_hard", "all_triplets", "semihard")
LABELS = ("random10", "pk4")
MODES = ("fwdbwd", "fwd")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

# a call predicted to take longer than this (seconds) is skipped with its prediction
TIME_LIMIT_S = float(os.environ.get("FASTDML_BENCH_TIME_LIMIT_S", "60"))


@dataclasses.dataclass(frozen=True)
class Variant:
    """One call of a loss family. ``native``: a fastdml-only class (no PML counterpart to compare with)."""

    family: str
    name: str
    loss: str
    miner: str | None = None
    miner_kwargs: tuple = ()
    native: bool = False

    @property
    def call(self) -> str:
        """The call as a user writes it."""
        if self.miner is None:
            return f"{self.loss}()(x, y)"
        kw = ", ".join(f"{k}={v!r}" for k, v in self.miner_kwargs)
        return f"{self.loss}()(x, y, {self.miner}({kw})(x, y))"


VARIANTS: dict[str, tuple[Variant, ...]] = {
    "contrastive": (Variant("contrastive", "ContrastiveLoss", "ContrastiveLoss"),),
    "batch_hard": (
        Variant("batch_hard", "TML_BatchHardMiner", "TripletMarginLoss", "BatchHardMiner"),
        Variant("batch_hard", "BatchHardTripletLoss", "BatchHardTripletLoss", native=True),
    ),
    "all_triplets": (
        Variant("all_triplets", "TripletMarginLoss", "TripletMarginLoss"),
        Variant("all_triplets", "BatchAllTripletLoss", "BatchAllTripletLoss", native=True),
    ),
    "semihard": (
        Variant(
            "semihard",
            "TML_SemihardMiner",
            "TripletMarginLoss",
            "TripletMarginMiner",
            (("type_of_triplets", "semihard"),),
        ),
        Variant("semihard", "SemiHardTripletLoss", "SemiHardTripletLoss", native=True),
    ),
}


def variant(family: str, name: str) -> Variant:
    for v in VARIANTS[family]:
        if v.name == name:
            return v
    raise KeyError(f"no variant {name!r} in family {family!r}")


def impls_for(device: str) -> tuple[str, ...]:
    """The implementations compared on ``device``."""
    if device == "cuda":
        return ("fastdml", "blocked", "reference", "pml")
    return ("fastdml", "reference", "pml")


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    variant: str
    impl: str
    mode: str
    n: int
    d: int
    dtype: str
    labels: str
    device: str

    @property
    def id(self) -> str:
        return f"{self.variant}-{self.impl}-{self.mode}-N{self.n}-D{self.d}-{self.dtype}-{self.labels}-{self.device}"

    @property
    def key(self) -> str:
        """Everything but the implementation: the cases compared with each other in the report."""
        return f"{self.family}/{self.variant}/{self.mode}/N{self.n}/D{self.d}/{self.dtype}/{self.labels}/{self.device}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Case:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def replace(self, **kw) -> Case:
        return dataclasses.replace(self, **kw)


def cases_for(
    family: str,
    device: str,
    sizes,
    dims,
    dtypes,
    labels,
    modes,
    impls=None,
) -> list[Case]:
    """Every case of ``family``, ordered by N so that small sizes run (and warm up) first."""
    out = []
    for n in sorted(sizes):
        for v in VARIANTS[family]:
            for impl in impls or impls_for(device):
                if impl == "pml" and v.native:
                    continue  # no PML class with these semantics: nothing to compare
                if impl == "blocked" and device != "cuda":
                    continue  # on the CPU the automatic path is the blocked path
                for mode in modes:
                    for d in dims:
                        for dt in dtypes:
                            for lab in labels:
                                out.append(Case(family, v.name, impl, mode, n, d, dt, lab, device))
    return out


# ------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------
def make_labels(pattern: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Labels of ``pattern``: ``random10`` (10 classes, uniform) or ``pkK`` (classes of K consecutive samples)."""
    if pattern == "random10":
        return torch.randint(0, 10, (n,), generator=generator)
    if pattern.startswith("pk"):
        k = int(pattern[2:])
        return torch.arange(n) // k
    raise ValueError(f"unknown label pattern {pattern!r}")


def make_inputs(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (N, D) requiring grad and int64 labels, on the case's device."""
    x = torch.randn(case.n, case.d, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    y = make_labels(case.labels, case.n, _label_generator(seed))
    x = x.to(device=case.device, dtype=DTYPES[case.dtype]).requires_grad_(True)
    return x, y.to(case.device)


def _label_generator(seed: int) -> torch.Generator:
    # labels draw from their own stream, so that they do not depend on D
    return torch.Generator().manual_seed(seed + 7919)


@functools.cache
def label_counts(pattern: str, n: int) -> dict:
    """Pair and triplet counts of the label pattern (the same seed as :func:`make_inputs`)."""
    y = make_labels(pattern, n, _label_generator(0))
    sizes = torch.bincount(y).to(torch.float64)
    pos = sizes * (sizes - 1)  # ordered positive pairs (i, p), p != i
    triplets = float((sizes * (sizes - 1) * (n - sizes)).sum())  # sum_i |P(i)| |Q(i)|
    return {"pos_pairs": float(pos.sum()), "neg_pairs": float(n * n - (sizes**2).sum()), "triplets": triplets}


# ------------------------------------------------------------------------------------------------------
# the calls
# ------------------------------------------------------------------------------------------------------
class Unavailable(Exception):
    """The implementation does not provide this call (yet): the case is skipped with this reason."""


def _module(impl: str, kind: str):
    """``losses`` or ``miners`` of PML (``impl == "pml"``) or of fastdml."""
    name = f"pytorch_metric_learning.{kind}" if impl == "pml" else f"fastdml.{kind}"
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise Unavailable(f"{name} does not import: {exc}") from exc


def backend_context(impl: str):
    """The context every call of ``impl`` runs in (the forced backend, if any)."""
    if impl in ("reference", "blocked"):
        import fastdml

        return fastdml.use_backend(impl)
    return contextlib.nullcontext()


def _check_own(case: Case, cls) -> None:
    # fastdml forwards unknown names to PML's classes: timing one of those as "fastdml" would compare PML to itself
    if case.impl != "pml" and cls.__module__.startswith("pytorch_metric_learning"):
        raise Unavailable(f"fastdml's {cls.__name__} is PML's own class (fallback)")


def build_call(case: Case) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn(x, y) -> loss`` for the case (loss and miner objects built once, outside the timed call)."""
    v = variant(case.family, case.variant)
    losses = _module(case.impl, "losses")
    cls = getattr(losses, v.loss, None)
    if cls is None:
        raise Unavailable(f"{losses.__name__} has no {v.loss}")
    _check_own(case, cls)
    loss_fn = cls()
    if v.miner is None:
        return lambda x, y: loss_fn(x, y)
    miners = _module(case.impl, "miners")
    mcls = getattr(miners, v.miner, None)
    if mcls is None:
        raise Unavailable(f"{miners.__name__} has no {v.miner}")
    _check_own(case, mcls)
    miner = mcls(**dict(v.miner_kwargs))
    return lambda x, y: loss_fn(x, y, miner(x, y))


def resolved_backend(case: Case, x: torch.Tensor) -> str | None:
    """The fastdml path the case's ops take (None for PML)."""
    if case.impl == "pml":
        return None
    from fastdml import dispatch

    with backend_context(case.impl):
        return dispatch.backend_for(x)


def make_step(case: Case, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """The timed call: forward (and backward), with the device synchronized before it returns."""
    fn = build_call(case)
    ctx = functools.partial(backend_context, case.impl)
    backward = case.mode == "fwdbwd"
    cuda = x.is_cuda

    def step():
        x.grad = None
        with ctx():
            loss = fn(x, y)
            if backward:
                loss.backward()
        if cuda:
            torch.cuda.synchronize()
        # detached: a forward-only call's graph is freed here, not kept alive into the next timed call
        return loss.detach()

    return step


# ------------------------------------------------------------------------------------------------------
# predictions: peak memory (bytes) and time per call (seconds)
# ------------------------------------------------------------------------------------------------------
def _pml_triplet_list_bytes(n: int, t: float) -> float:
    # PML's get_all_triplets_indices builds the (N, N, N) uint8 product below 2^31 elements, then per
    # triplet: index lists, gathered distances, margins, hinge, mask and gradients (44-54 bytes each on the
    # CPU, fp32; check with `python -m bench._memory <case id>`)
    if n**3 < 2**31:
        return n**3 + 52.0 * t
    return 56.0 * t


def work(case: Case) -> float:
    """The count that a call's time grows with (its dominant loop), used to extrapolate timings in N."""
    n, d = case.n, case.d
    c = label_counts(case.labels, n)
    if case.family in ("all_triplets", "semihard"):
        if case.impl == "pml":
            # the triplet lists, plus PML's (N, N, N) uint8 product below 2^31 elements (fitted: 1/64 of a triplet)
            return c["triplets"] + (n**3 / 64 if n**3 < 2**31 else 0.0)
        if case.impl == "reference":
            return c["pos_pairs"] * n if case.variant == "SemiHardTripletLoss" else float(n) ** 3
        return float(n) * n * d * 3
    return float(n) * n * d


# seconds per unit of work() on a 2-core CPU under load (on the high side): `python -m bench.calibrate`
_SECONDS_PER_WORK = {
    ("pml", True): 1.2e-7,
    ("pml", False): 5e-9,
    ("reference", True): 1e-7,
    ("reference", False): 5e-8,
    ("fastdml", True): 2e-9,
    ("fastdml", False): 2e-9,
    ("blocked", True): 2e-9,
    ("blocked", False): 2e-9,
}


def predict(case: Case, measured: tuple[int, float] | None = None) -> dict:
    """Predicted ``{"bytes", "seconds", "formula"}`` of one call of the case.

    ``measured``: ``(n0, seconds)`` of the same case at a smaller N in this session; the time is then
    extrapolated from it with :func:`work` (else from the static per-unit costs above).
    """
    n, d = case.n, case.d
    b = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    c = label_counts(case.labels, n)
    t, p2 = c["triplets"], c["pos_pairs"]
    gpu = case.device == "cuda"
    io = 6 * n * d * max(b, 4)  # inputs, normalized copy, gradient
    triplet_family = case.family in ("all_triplets", "semihard")
    if case.impl == "pml":
        if triplet_family:
            mem = _pml_triplet_list_bytes(n, t) + 64 * n * n + io
            formula = "N^3 [if N^3 < 2^31] + 52..56 B x triplets + 64 B x N^2"
        else:
            mem = 64.0 * n * n + io
            formula = "64 B x N^2"
    elif case.impl == "reference":
        if triplet_family and case.variant != "SemiHardTripletLoss":
            # the reference sweeps (rows, N, N) triplet blocks under autograd, which keeps every block's
            # hinge and masks for the backward: measured 6.7 bytes per (anchor, p, n) element
            mem = 7.0 * n**3 + 64 * n * n + io
            formula = "7 B x N^3 + 64 B x N^2"
        elif case.variant == "SemiHardTripletLoss":
            # (positive pairs, N) rows of distances and masks
            mem = 24.0 * p2 * n + 64 * n * n + io
            formula = "24 B x (positive pairs) x N + 64 B x N^2"
        elif case.family == "contrastive":
            # the direct-difference distance under autograd keeps every (i, j, :) difference: N^2 D values
            mem = 5.0 * n * n * d + 64 * n * n + io
            formula = "5 B x N^2 D + 64 B x N^2"
        else:
            # batch-hard: the mining runs without autograd; measured ~130 B per pair
            mem = 160.0 * n * n + io
            formula = "160 B x N^2"
    else:
        # fastdml's blocked path: its working-memory budget; Triton: O(N D)
        if gpu:
            mem, formula = io, "O(N D)"
        else:
            from fastdml import config

            mem = config.memory_budget_bytes() + io
            formula = "memory budget + O(N D)"
    if measured is not None and measured[0] < n:
        n0, s0 = measured
        # 1.2: larger working sets fall out of the caches, so growth is a little faster than the work count
        sec = 1.2 * s0 * work(case) / max(work(case.replace(n=n0)), 1.0)
    else:
        sec = _SECONDS_PER_WORK.get((case.impl, triplet_family), 1e-8) * work(case)
        if gpu:
            sec /= 50.0
        if case.mode == "fwd":
            sec *= 0.6
    return {"bytes": float(mem), "seconds": float(sec), "formula": formula}


def memory_limit_bytes(device: str) -> float:
    """The most a case may be predicted to use: most of the GPU, or a share of the RAM available now."""
    env = os.environ.get("FASTDML_BENCH_MEM_LIMIT_GB")
    if env:
        return float(env) * 1e9
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return 0.85 * free
    avail = _meminfo("MemAvailable")
    # leave room for everything else on a shared machine
    return min(0.6 * avail, 16e9) if avail else 8e9


def _meminfo(field: str) -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------------
# versions and machine
# ------------------------------------------------------------------------------------------------------
@functools.cache
def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod, key in (("triton", "triton"), ("fastdml", "fastdml"), ("pytorch_metric_learning", "pml")):
        try:
            out[key] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception:
            out[key] = None
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        out["git"] = commit + ("+dirty" if dirty else "") if commit else None
    except Exception:
        out["git"] = None
    return out


@functools.cache
def machine(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = os.cpu_count()
    ram = _meminfo("MemTotal")
    ram_s = f", {ram / 2**30:.0f} GiB RAM" if ram else ""
    name = model or platform.processor() or "unknown"
    return f"{cores}-core CPU ({name}){ram_s}, torch threads {torch.get_num_threads()}"


def fmt_bytes(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    for unit, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(v) >= s:
            return f"{v / s:.3g} {unit}"
    return f"{v:.0f} B"


def fmt_seconds(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 1:
        return f"{v:.3g} s"
    if v >= 1e-3:
        return f"{v * 1e3:.3g} ms"
    return f"{v * 1e6:.3g} us"
