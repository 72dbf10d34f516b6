"""pytest set-up of the benchmark suites: options, case parametrization, the session's records.

Options (all optional)::

    --bench-sizes 256,1024,4096   N values           --bench-dims 128        D values
    --bench-dtypes float32        dtypes             --bench-labels random10,pk4
    --bench-modes fwdbwd,fwd      timed calls        --bench-impls fastdml,reference,pml(,blocked)
    --bench-device auto|cpu|cuda  device             --bench-tiny            tiny sizes (CI)
    --bench-no-memory             skip peak memory   --bench-records PATH    skips/failures JSON
    --bench-target-s 2.0          seconds per case   --bench-max-rounds 20
    --bench-budget-s S            stop starting cases after S seconds (recorded as skipped)

Without pytest-benchmark installed, ``bench/_shim.py`` stands in for its ``benchmark`` fixture and its
``--benchmark-json`` / ``--benchmark-disable`` options.

``FASTDML_BENCH_TINY=1`` is the same as ``--bench-tiny``: N in {24, 70}, D = 8, no memory worker, each
timed call checked against fastdml's reference. CI runs the files that way with ``--benchmark-disable``
(tests/test_bench_smoke.py), so the suites stay correct without ever asserting a speed.
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from bench import _cases, _memory

try:  # pytest-benchmark when installed; else the stand-in of bench/_shim.py (GPU machines without the plugin)
    if os.environ.get("FASTDML_BENCH_SHIM") == "1":  # force the stand-in (with -p no:benchmark), to test it
        raise ImportError("FASTDML_BENCH_SHIM=1")
    import pytest_benchmark  # noqa: F401

    HAVE_PYTEST_BENCHMARK = True
except ImportError:
    from bench import _shim

    HAVE_PYTEST_BENCHMARK = False
    benchmark = _shim.make_fixture()

DEFAULT_SIZES = (256, 1024, 4096)
TINY_SIZES = (24, 70)


def pytest_addoption(parser):
    if not HAVE_PYTEST_BENCHMARK:
        _shim.add_options(parser)
    g = parser.getgroup("fastdml-bench")
    g.addoption("--bench-sizes", default=None, help="comma-separated N values (default 256,1024,4096)")
    g.addoption("--bench-dims", default=None, help="comma-separated D values (default 128)")
    g.addoption("--bench-dtypes", default=None, help="comma-separated dtypes (default float32)")
    g.addoption("--bench-labels", default=None, help="label patterns: random10, pk4 (default both)")
    g.addoption("--bench-modes", default=None, help="fwdbwd, fwd (default both)")
    g.addoption("--bench-impls", default=None, help="fastdml, reference, pml, blocked (default: all for the device)")
    g.addoption("--bench-device", default="auto", help="auto (cuda if available), cpu or cuda")
    g.addoption("--bench-tiny", action="store_true", help="tiny sizes for CI (also FASTDML_BENCH_TINY=1)")
    g.addoption("--bench-no-memory", action="store_true", help="do not measure peak memory")
    g.addoption("--bench-records", default=None, help="where to write the skip/failure records (JSON)")
    g.addoption("--bench-target-s", type=float, default=2.0, help="about how long each case is timed")
    g.addoption("--bench-max-rounds", type=int, default=20, help="most timed rounds per case")
    g.addoption("--bench-memory-cache", default=_memory.DEFAULT_CACHE, help="CPU memory cache ('' for none)")
    g.addoption(
        "--bench-budget-s",
        type=float,
        default=None,
        help="stop starting cases after this many seconds (the rest are recorded as skipped), so that a run "
        "under an outer time limit still ends cleanly and writes its JSON",
    )


def _list(value, default, cast=str):
    if value is None or value == "":
        return tuple(default)
    return tuple(cast(v.strip()) for v in value.split(",") if v.strip())


class Options:
    def __init__(self, config):
        opt = config.getoption
        self.tiny = bool(opt("--bench-tiny")) or os.environ.get("FASTDML_BENCH_TINY", "0") == "1"
        device = opt("--bench-device")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.sizes = _list(opt("--bench-sizes"), TINY_SIZES if self.tiny else DEFAULT_SIZES, int)
        self.dims = _list(opt("--bench-dims"), (8,) if self.tiny else (128,), int)
        self.dtypes = _list(opt("--bench-dtypes"), ("float32",))
        self.labels = _list(opt("--bench-labels"), _cases.LABELS)
        self.modes = _list(opt("--bench-modes"), _cases.MODES)
        impls = _list(opt("--bench-impls"), _cases.impls_for(device))
        self.impls = tuple(i for i in impls if i in _cases.impls_for(device))
        for name, values, allowed in (
            ("--bench-dtypes", self.dtypes, _cases.DTYPES),
            ("--bench-modes", self.modes, _cases.MODES),
            ("--bench-impls", impls, ("fastdml", "reference", "pml", "blocked")),
        ):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise pytest.UsageError(f"{name}: unknown value(s) {bad}; choose from {list(allowed)}")
        self.memory = not opt("--bench-no-memory") and not self.tiny
        self.target_s = opt("--bench-target-s")
        self.max_rounds = opt("--bench-max-rounds")
        self.memory_cache = opt("--bench-memory-cache") or None
        self.budget_s = opt("--bench-budget-s")
        records = opt("--bench-records")
        if records is None:
            bj = config.getoption("--benchmark-json", None)
            records = (os.path.splitext(str(bj))[0] + ".records.json") if bj else None
        self.records = records


class BenchSession:
    """State shared by the cases of one pytest session: options, the memory meter, the records."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.tiny = opts.tiny
        self.records: list[dict] = []
        self._meter = None
        self._limits: dict[str, float] = {}
        self._timings: dict[_cases.Case, float] = {}
        self._t0 = time.monotonic()

    def over_budget(self) -> bool:
        """True once the session has run longer than ``--bench-budget-s``."""
        return self.opts.budget_s is not None and time.monotonic() - self._t0 > self.opts.budget_s

    def note_timing(self, case, seconds: float) -> None:
        """One call of ``case`` took ``seconds`` (used to predict the same case at larger N)."""
        self._timings[case] = min(seconds, self._timings.get(case, math.inf))

    def known_timing(self, case):
        """The fastest call of exactly this case measured in this session (seconds), or None."""
        return self._timings.get(case)

    def timing_below(self, case):
        """``(n0, seconds)`` of the same case at the largest N below ``case.n`` whose call took long enough
        (>= 0.1 s) for fixed costs not to dominate the extrapolation, or None."""
        best = None
        for c, sec in self._timings.items():
            if sec < 0.1 or c.n >= case.n or c.replace(n=case.n) != case:
                continue
            if best is None or c.n > best[0]:
                best = (c.n, sec)
        return best

    @property
    def meter(self) -> _memory.MemoryMeter:
        if self._meter is None:
            self._meter = _memory.MemoryMeter(self.opts.memory_cache)
        return self._meter

    def mem_limit(self, device: str) -> float:
        if device not in self._limits:
            self._limits[device] = _cases.memory_limit_bytes(device)
        return self._limits[device]

    def record(self, case, status: str, **info) -> None:
        row = {"status": status, "case": case.to_dict() if hasattr(case, "to_dict") else case}
        row["nodeid"] = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        row.update(info)
        self.records.append(row)

    def close(self) -> None:
        if self._meter is not None:
            self._meter.close()
        if self.opts.records:
            os.makedirs(os.path.dirname(os.path.abspath(self.opts.records)), exist_ok=True)
            with open(self.opts.records, "w") as f:
                json.dump(
                    {
                        "device": self.opts.device,
                        "machine": _cases.machine(self.opts.device),
                        "versions": _cases.versions(),
                        "records": self.records,
                    },
                    f,
                    indent=1,
                )


_SESSION: BenchSession | None = None


def pytest_configure(config):
    global _SESSION
    _SESSION = BenchSession(Options(config))
    if not HAVE_PYTEST_BENCHMARK:
        config._fastdml_bench_collector = _shim.Collector(config.getoption("--benchmark-json"))


def pytest_unconfigure(config):
    if _SESSION is not None:
        _SESSION.close()
    if not HAVE_PYTEST_BENCHMARK and hasattr(config, "_fastdml_bench_collector"):
        config._fastdml_bench_collector.write()


def pytest_collection_modifyitems(session, config, items):
    """Run order: the headline comparison, the GEMM floors, then every family's cases by increasing N.

    Ordering by N across families (rather than file by file) means that a run cut short by
    ``--bench-budget-s`` loses the largest sizes, not whole families; and the headline's measurements
    (memory, first timings) are there for the suites to reuse.
    """

    def key(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        case = params.get("case")
        if case is not None:
            v_names = [v.name for v in _cases.VARIANTS[case.family]]
            return (
                2,
                case.n,
                _cases.FAMILIES.index(case.family),
                v_names.index(case.variant),
                case.labels != "random10",
                case.mode != "fwdbwd",
                case.impl,
            )
        if "floor_shape" in params:
            return (1, params["floor_shape"][0])
        if "name" in params and item.module.__name__.endswith("test_bench_targets"):
            return (0, 0)
        return (3, 0)

    items.sort(key=key)


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    # a case that failed while timed (not in the memory worker, which records its own) goes to the records
    if report.failed and report.when == "call" and _SESSION is not None:
        known = {r.get("nodeid") for r in _SESSION.records}
        if report.nodeid not in known:
            msg = str(report.longrepr).strip().splitlines()
            _SESSION.records.append(
                {"status": "failed", "case": {}, "nodeid": report.nodeid, "reason": msg[-1][:300] if msg else ""}
            )


@pytest.fixture(scope="session")
def bench_session() -> BenchSession:
    return _SESSION


# outside tiny mode: no forward-alone timing of calls predicted slower than this (the slow baselines), other
# label patterns than 10 random classes forward+backward only, the reference with 10 random classes only
FWD_ONLY_BELOW_S = 5.0


def _keep(case, tiny: bool) -> bool:
    if case.impl == "reference" and case.labels != "random10" and not tiny:
        return False  # the reference materializes everything: its cost does not depend on the labels
    if case.mode == "fwdbwd":
        return True
    if case.labels != "random10":
        return False
    return tiny or _cases.predict(case)["seconds"] < FWD_ONLY_BELOW_S


def pytest_generate_tests(metafunc):
    opts = _SESSION.opts
    if "case" in metafunc.fixturenames:
        family = metafunc.module.FAMILY
        cases = _cases.cases_for(
            family, opts.device, opts.sizes, opts.dims, opts.dtypes, opts.labels, opts.modes, opts.impls
        )
        cases = [c for c in cases if _keep(c, opts.tiny)]
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])
    if "floor_shape" in metafunc.fixturenames:
        shapes = [(n, d, dt, opts.device) for n in sorted(opts.sizes) for d in opts.dims for dt in opts.dtypes]
        metafunc.parametrize("floor_shape", shapes, ids=[f"N{n}-D{d}-{dt}-{dev}" for n, d, dt, dev in shapes])
