"""A stand-in for pytest-benchmark's ``benchmark`` fixture, used only where the plugin is not installed.

The GPU machines this project borrows have pytest but not always pytest-benchmark. The suites use a small
part of the plugin (``benchmark.pedantic``, ``extra_info``, ``group``, ``enabled``, ``--benchmark-json``,
``--benchmark-disable``); this module provides exactly that part, times with ``time.perf_counter`` (the
suites synchronize the device inside each call) and writes a JSON with the plugin's layout (``benchmarks``:
``group``, ``name``, ``fullname``, ``extra_info``, ``stats`` with ``min``/``max``/``mean``/``median``/
``stddev``/``rounds``/``data``), which is all :mod:`bench.report` reads.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time

import pytest


def add_options(parser) -> None:
    g = parser.getgroup("benchmark (fastdml stand-in: pytest-benchmark is not installed)")
    g.addoption("--benchmark-json", default=None, help="write the timings to this JSON")
    g.addoption("--benchmark-disable", action="store_true", help="run each benchmarked call once, untimed")
    # accepted for command-line compatibility with the plugin, ignored
    g.addoption("--benchmark-columns", default=None)
    g.addoption("--benchmark-sort", default=None)


class Benchmark:
    """The subset of pytest-benchmark's fixture the suites use."""

    def __init__(self, name: str, fullname: str, disabled: bool):
        self.name, self.fullname = name, fullname
        self.disabled = disabled
        self.group = None
        self.extra_info: dict = {}
        self.stats: dict | None = None

    @property
    def enabled(self) -> bool:
        return not self.disabled

    def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        kwargs = kwargs or {}
        if self.disabled:
            return target(*args, **kwargs)
        for _ in range(warmup_rounds):
            target(*args, **kwargs)
        data, result = [], None
        for _ in range(rounds):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            for _ in range(iterations):
                result = target(*args, **kwargs)
            data.append((time.perf_counter() - t0) / iterations)
        self.stats = {
            "min": min(data),
            "max": max(data),
            "mean": statistics.fmean(data),
            "median": statistics.median(data),
            "stddev": statistics.stdev(data) if len(data) > 1 else 0.0,
            "rounds": len(data),
            "iterations": iterations,
            "data": data,
        }
        return result

    def to_json(self) -> dict:
        return {
            "group": self.group,
            "name": self.name,
            "fullname": self.fullname,
            "extra_info": self.extra_info,
            "stats": self.stats,
        }


class Collector:
    def __init__(self, path: str | None):
        self.path = path
        self.done: list[Benchmark] = []

    def write(self) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        data = {
            "machine_info": {},
            "commit_info": {},
            "benchmarks": [b.to_json() for b in self.done if b.stats is not None],
            "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "version": "fastdml-bench-shim",
        }
        with open(self.path, "w") as f:
            json.dump(data, f, indent=1)


def make_fixture():
    @pytest.fixture
    def benchmark(request):
        collector = request.config._fastdml_bench_collector
        b = Benchmark(request.node.name, request.node.nodeid, bool(request.config.getoption("--benchmark-disable")))
        yield b
        collector.done.append(b)

    return benchmark
