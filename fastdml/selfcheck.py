"""The self-check: every loss and miner on a device against the reference, and against PML where installed.

A **loss case** runs ``loss(x, y[, miner(x, y)])`` on the device in float32 under the automatic path (or a
forced backend), then ``(value * g).backward()`` with a random upstream gradient ``g``; the oracle is the
same public call under ``fastdml.use_backend("reference")`` on the very same values upcast to float64.
Value and gradient pass when ``|got - want| <= atol + rtol |want|`` everywhere, with the float32 tolerances
of the parity tests (``atol = 1e-5``, ``rtol = 1e-4``: fp32 rounding of GEMM-shaped sums over D and of tile
reductions). PML (float64, same values) is a second oracle for the calls PML also has.

A **miner case** lists the miner's index tuple on the device and compares it with the reference's (and
PML's): they must be identical.

Inputs. Losses without selections (contrastive, all triplets, batch-all, paired) take Gaussian embeddings
with their default distance. Everything that selects (batch-hard and semi-hard picks, miner bands and
thresholds) takes embeddings on a half-integer lattice in [-2, 2] with a plain L2 distance: every squared
distance is then a small multiple of 1/4, exact in fp32 (tf32x3 too) and float64, so a float32 path and the
float64 oracle see the same order and make the same selections; no legitimate rounding can flip a pick.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

import fastdml
from fastdml import distances, losses, miners

# float32 against a float64 oracle: the parity tests' tolerances (tests/conftest.py)
ATOL, RTOL = 1e-5, 1e-4


@dataclass(frozen=True)
class Case:
    """One self-check case: ``make()`` builds ``loss`` or ``(loss, miner)`` or a miner (``kind``);
    ``pml`` builds the same call from ``pytorch_metric_learning`` modules (None: PML has no such call)."""

    name: str
    kind: str  # "loss", "loss+miner", "paired" or "miner"
    inputs: str  # "gauss" or "lattice"
    make: Callable[[object, object], object]
    pml: Optional[Callable[[object, object], object]] = None


def _plain(mod):
    return mod.LpDistance(normalize_embeddings=False)


CASES = (
    Case("ContrastiveLoss", "loss", "gauss", lambda L, M: L.ContrastiveLoss(), lambda L, M: L.ContrastiveLoss()),
    Case(
        "TripletMarginLoss",
        "loss",
        "gauss",
        lambda L, M: L.TripletMarginLoss(margin=0.2),
        lambda L, M: L.TripletMarginLoss(margin=0.2),
    ),
    Case(
        "BatchAllTripletLoss",
        "loss",
        "gauss",
        lambda L, M: L.BatchAllTripletLoss(),
        lambda L, M: L.TripletMarginLoss(margin=0.2, distance=_plain(_pml_mod("distances"))),
    ),
    Case(
        "BatchHardTripletLoss",
        "loss",
        "lattice",
        lambda L, M: L.BatchHardTripletLoss(margin=0.3),
        lambda L, M: (
            L.TripletMarginLoss(
                margin=0.3, distance=_plain(_pml_mod("distances")), reducer=_pml_mod("reducers").MeanReducer()
            ),
            M.BatchHardMiner(distance=_plain(_pml_mod("distances"))),
        ),
    ),
    Case("SemiHardTripletLoss", "loss", "lattice", lambda L, M: L.SemiHardTripletLoss(margin=0.3)),
    Case("PairedContrastiveLoss", "paired", "gauss", lambda L, M: L.PairedContrastiveLoss(margin=1.5)),
    Case(
        "TripletMarginLoss+BatchHardMiner",
        "loss+miner",
        "lattice",
        lambda L, M: (
            L.TripletMarginLoss(margin=0.3, distance=_plain(distances)),
            M.BatchHardMiner(distance=_plain(distances)),
        ),
        lambda L, M: (
            L.TripletMarginLoss(margin=0.3, distance=_plain(_pml_mod("distances"))),
            M.BatchHardMiner(distance=_plain(_pml_mod("distances"))),
        ),
    ),
    Case(
        "TripletMarginLoss+TripletMarginMiner",
        "loss+miner",
        "lattice",
        lambda L, M: (
            L.TripletMarginLoss(margin=0.3, distance=_plain(distances)),
            M.TripletMarginMiner(margin=0.7, type_of_triplets="semihard", distance=_plain(distances)),
        ),
        lambda L, M: (
            L.TripletMarginLoss(margin=0.3, distance=_plain(_pml_mod("distances"))),
            M.TripletMarginMiner(margin=0.7, type_of_triplets="semihard", distance=_plain(_pml_mod("distances"))),
        ),
    ),
    Case(
        "ContrastiveLoss+PairMarginMiner",
        "loss+miner",
        "lattice",
        lambda L, M: (
            L.ContrastiveLoss(pos_margin=0.5, neg_margin=2.3, distance=_plain(distances)),
            M.PairMarginMiner(pos_margin=1.6, neg_margin=2.6, distance=_plain(distances)),
        ),
        lambda L, M: (
            L.ContrastiveLoss(pos_margin=0.5, neg_margin=2.3, distance=_plain(_pml_mod("distances"))),
            M.PairMarginMiner(pos_margin=1.6, neg_margin=2.6, distance=_plain(_pml_mod("distances"))),
        ),
    ),
    Case(
        "ContrastiveLoss+BatchEasyHardMiner",
        "loss+miner",
        "lattice",
        lambda L, M: (
            L.ContrastiveLoss(pos_margin=0.5, neg_margin=2.3, distance=_plain(distances)),
            M.BatchEasyHardMiner(distance=_plain(distances)),
        ),
        lambda L, M: (
            L.ContrastiveLoss(pos_margin=0.5, neg_margin=2.3, distance=_plain(_pml_mod("distances"))),
            M.BatchEasyHardMiner(distance=_plain(_pml_mod("distances"))),
        ),
    ),
    Case(
        "TripletMarginMiner(all)",
        "miner",
        "lattice",
        lambda L, M: M.TripletMarginMiner(margin=0.7, type_of_triplets="all", distance=_plain(distances)),
        lambda L, M: M.TripletMarginMiner(margin=0.7, type_of_triplets="all", distance=_plain(_pml_mod("distances"))),
    ),
    Case(
        "TripletMarginMiner(hard)",
        "miner",
        "lattice",
        lambda L, M: M.TripletMarginMiner(margin=0.7, type_of_triplets="hard", distance=_plain(distances)),
        lambda L, M: M.TripletMarginMiner(margin=0.7, type_of_triplets="hard", distance=_plain(_pml_mod("distances"))),
    ),
    Case(
        "PairMarginMiner",
        "miner",
        "lattice",
        lambda L, M: M.PairMarginMiner(pos_margin=1.6, neg_margin=2.6, distance=_plain(distances)),
        lambda L, M: M.PairMarginMiner(pos_margin=1.6, neg_margin=2.6, distance=_plain(_pml_mod("distances"))),
    ),
    Case(
        "BatchHardMiner",
        "miner",
        "lattice",
        lambda L, M: M.BatchHardMiner(distance=_plain(distances)),
        lambda L, M: M.BatchHardMiner(distance=_plain(_pml_mod("distances"))),
    ),
    Case(
        "BatchEasyHardMiner",
        "miner",
        "lattice",
        lambda L, M: M.BatchEasyHardMiner(distance=_plain(distances)),
        lambda L, M: M.BatchEasyHardMiner(distance=_plain(_pml_mod("distances"))),
    ),
    Case(
        "MultiSimilarityMiner",
        "miner",
        "lattice",
        lambda L, M: M.MultiSimilarityMiner(epsilon=0.3, distance=_plain(distances)),
        lambda L, M: M.MultiSimilarityMiner(epsilon=0.3, distance=_plain(_pml_mod("distances"))),
    ),
)


def _pml_mod(name: str):
    import importlib

    return importlib.import_module(f"pytorch_metric_learning.{name}")


def pml_available() -> bool:
    """True when pytorch-metric-learning imports."""
    try:
        import pytorch_metric_learning  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class Check:
    """One line of the pass/fail table."""

    target: str  # "cpu", "cuda", "cpu (triton interpreter)"
    precision: str
    case: str
    n: int
    d: int
    against: str  # "reference" or "pml"
    backend: str = ""
    passed: bool = False
    value_err: Optional[float] = None
    grad_err: Optional[float] = None
    worst_ratio: Optional[float] = None  # max |got - want| / (atol + rtol |want|): passes at <= 1
    seconds: float = 0.0
    detail: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def make_inputs(case: Case, n: int, d: int, seed: int):
    """float32 embeddings and int64 labels (and, for paired, the second side) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    if case.inputs == "lattice":
        x = torch.randint(-4, 5, (n, d), generator=g).float() / 2
    else:
        x = torch.randn(n, d, generator=g)
    classes = max(2, min(n // 4, 7))
    y = torch.randint(0, classes, (n,), generator=g)
    extra = None
    if case.kind == "paired":
        extra = (torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g))
        y = torch.randint(0, 3, (n,), generator=g)
    return x, y, extra


def _closeness(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max of |got - want| / (atol + rtol |want|)); inf where either side is non-finite."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return math.inf, math.inf
    if got.numel() == 0:
        return 0.0, 0.0
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return math.inf, math.inf
    diff = (got - want).abs()
    return float(diff.max()), float((diff / (ATOL + RTOL * want.abs())).max())


def _run_loss(case: Case, built, x, y, extra, upstream: float):
    """(value, gradients) of one loss call at ``x`` (and the paired side), upstream gradient ``upstream``."""
    x = x.detach().clone().requires_grad_(True)
    leaves = [x]
    if case.kind == "paired":
        x2, y2 = extra
        x2 = x2.detach().clone().requires_grad_(True)
        leaves.append(x2)
        value = built(x, x2, y, y2)
    elif isinstance(built, tuple):  # (loss, miner); PML's equivalent of a one-pass fastdml loss may be one
        loss, miner = built
        value = loss(x, y, miner(x, y))
    else:
        value = built(x, y)
    (value * upstream).backward()
    return value.detach(), [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def _run_miner(built, x, y):
    return tuple(t.detach().cpu() for t in built(x, y))


def _compare(check: Check, got, want) -> None:
    if check.extra.get("kind") == "miner":
        same = len(got) == len(want) and all(
            a.shape == b.shape and torch.equal(a.cpu(), b.cpu()) for a, b in zip(got, want)
        )
        counts = [int(t.numel()) for t in got]
        check.passed = bool(same)
        check.detail = f"indices {'identical' if same else 'DIFFER'} ({counts} listed)"
        check.value_err = 0.0 if same else math.inf
        return
    (gv, gg), (wv, wg) = got, want
    verr, vratio = _closeness(gv, wv)
    gerrs = [_closeness(a, b) for a, b in zip(gg, wg)]
    gerr = max((e for e, _ in gerrs), default=0.0)
    ratio = max([vratio] + [r for _, r in gerrs])
    check.value_err, check.grad_err, check.worst_ratio = verr, gerr, ratio
    scale = max((float(b.detach().abs().max()) for b in wg if b.numel()), default=0.0)
    check.passed = ratio <= 1.0 and scale > 0
    check.detail = f"value {float(gv):.6g} vs {float(wv):.6g}; max |grad| {scale:.3g}"
    if scale == 0:
        check.detail += " (zero gradient: the case exercises nothing)"


def _oracle(case: Case, against: str, x, y, extra, upstream: float, device):
    """The float64 oracle's result: fastdml's reference path, or PML."""
    x64 = x.double().to(device)
    y64 = y.to(device)
    extra64 = None if extra is None else (extra[0].double().to(device), extra[1].to(device))
    if against == "reference":
        built = case.make(losses, miners)
        with fastdml.use_backend("reference"):
            if case.kind == "miner":
                return _run_miner(built, x64, y64)
            return _run_loss(case, built, x64, y64, extra64, upstream)
    built = case.pml(_pml_mod("losses"), _pml_mod("miners"))
    if case.kind == "miner":
        return _run_miner(built, x64, y64)
    return _run_loss(case, built, x64, y64, extra64, upstream)


def run_case(
    case: Case,
    target: str,
    device: str,
    n: int,
    d: int,
    backend_ctx=contextlib.nullcontext,
    precision: str = "ieee",
    against=("reference", "pml"),
    seed: int = 0,
) -> list[Check]:
    """Check one case at one size: fastdml on ``device`` under ``backend_ctx()`` against each oracle."""
    from fastdml import dispatch

    x, y, extra = make_inputs(case, n, d, seed)
    upstream = 0.5 + float(torch.rand((), generator=torch.Generator().manual_seed(seed + 1)))
    xd, yd = x.to(device), y.to(device)
    extrad = None if extra is None else (extra[0].to(device), extra[1].to(device))
    checks = []
    t0 = time.perf_counter()
    got, error = None, None
    backend = ""
    try:
        with backend_ctx():
            backend = dispatch.backend_for(xd)
            built = case.make(losses, miners)
            if case.kind == "miner":
                got = _run_miner(built, xd, yd)
            else:
                got = _run_loss(case, built, xd, yd, extrad, upstream)
    except Exception as exc:
        error = f"fastdml raised {type(exc).__name__}: {str(exc)[:300]}"
        tb = traceback.format_exc(limit=6)
    own_s = time.perf_counter() - t0
    for who in against:
        if who == "pml" and (case.pml is None or not pml_available()):
            continue
        check = Check(target, precision, case.name, n, d, who, backend=backend, extra={"kind": case.kind})
        t1 = time.perf_counter()
        if error is not None:
            check.detail, check.extra["traceback"] = error, tb
        else:
            try:
                _compare(check, got, _oracle(case, who, x, y, extra, upstream, device))
            except Exception as exc:
                check.detail = f"{who} raised {type(exc).__name__}: {str(exc)[:300]}"
                check.extra["traceback"] = traceback.format_exc(limit=6)
        check.seconds = own_s + time.perf_counter() - t1
        checks.append(check)
    return checks


def run_checks(
    target: str,
    device: str,
    sizes,
    backend_ctx=contextlib.nullcontext,
    precision: str = "ieee",
    against=("reference", "pml"),
    cases=CASES,
    on_check: Optional[Callable[[Check], None]] = None,
) -> list[Check]:
    """Every case at every ``(n, d)`` in ``sizes``."""
    out = []
    for n, d in sizes:
        for i, case in enumerate(cases):
            for check in run_case(case, target, device, n, d, backend_ctx, precision, against, seed=1000 * n + i):
                out.append(check)
                if on_check is not None:
                    on_check(check)
    return out


# --------------------------------------------------------------------------------------------------------
# which ops and backend functions each case reaches
# --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _recording(modules: dict):
    """Wrap every public function of the given modules (``{label: module}``) to record its calls."""
    calls: list[str] = []
    saved = []
    for label, mod in modules.items():
        names = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
        for name in names:
            fn = getattr(mod, name, None)
            if not callable(fn) or isinstance(fn, type):
                continue

            def wrapper(*args, __fn=fn, __tag=f"{label}.{name}", **kwargs):
                calls.append(__tag)
                return __fn(*args, **kwargs)

            saved.append((mod, name, fn))
            setattr(mod, name, wrapper)
    try:
        yield calls
    finally:
        for mod, name, fn in reversed(saved):
            setattr(mod, name, fn)


def trace_paths(device: str, backend_ctx=contextlib.nullcontext, cases=CASES) -> list[dict]:
    """For each case: dispatch's answer for a float32 tensor on ``device`` and the ``fastdml.ops`` primitives
    and backend functions (``blocked.*``, ``kernels.*``, ``portable.*``, ``reference.*``) one small call
    reaches."""
    import importlib

    from fastdml import dispatch, ops, reference

    modules = {"ops": ops, "reference": reference, "blocked": importlib.import_module("fastdml.blocked")}
    with contextlib.suppress(ImportError):  # device-independent torch code, where this fastdml has it
        modules["portable"] = importlib.import_module("fastdml.portable")
    out = []
    for i, case in enumerate(cases):
        x, y, extra = make_inputs(case, 16, 4, seed=i)
        xd, yd = x.to(device), y.to(device)
        extrad = None if extra is None else (extra[0].to(device), extra[1].to(device))
        row = {"case": case.name, "backend": "", "calls": [], "error": None}
        try:
            with backend_ctx():
                row["backend"] = dispatch.backend_for(xd)
                if row["backend"] == "triton":
                    modules["kernels"] = importlib.import_module("fastdml.kernels")
                with _recording(modules) as calls:
                    built = case.make(losses, miners)
                    if case.kind == "miner":
                        _run_miner(built, xd, yd)
                    else:
                        _run_loss(case, built, xd, yd, extrad, 1.0)
            row["calls"] = list(dict.fromkeys(calls))  # first-call order, no repeats
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        out.append(row)
    return out
