"""The benchmark suites stay correct: CI runs them with ``--benchmark-disable`` on tiny sizes, never timed.

- every bench file runs in tiny mode (``FASTDML_BENCH_TINY=1``: N in {24, 70}, D = 8), where each timed
  call is also checked to give fastdml's reference loss (and, for the drop-in calls, PML's);
- the report command runs end to end on one tiny family and writes its table and chart;
- a baseline that cannot fit (PML's all-triplets at N = 4096: ~150 GB) is recorded with its prediction and
  never started;
- the CPU peak-memory meter sees a known allocation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the suites of bench/ (test_bench_*.py), not other scripts kept there
BENCH_FILES = sorted(
    f"bench/{f}" for f in os.listdir(os.path.join(ROOT, "bench")) if f.startswith("test_bench_") and f.endswith(".py")
)


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run(args, timeout=300, **env):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout
    )


def test_bench_suites_run_and_agree_with_the_reference_in_tiny_mode(tmp_path):
    records = tmp_path / "records.json"
    r = _run(
        ["-m", "pytest", *BENCH_FILES, "-q", "-p", "no:cacheprovider", "--benchmark-disable"]
        + [f"--bench-records={records}"],
        FASTDML_BENCH_TINY="1",
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
    data = json.loads(records.read_text())
    measured = [x for x in data["records"] if x["status"] == "measured"]
    families = {x["case"]["family"] for x in measured}
    assert families == {"contrastive", "batch_hard", "all_triplets", "semihard"}
    impls = {x["case"]["impl"] for x in measured}
    assert {"fastdml", "reference", "pml"} <= impls
    targets = [x for x in data["records"] if x["status"] == "target"]
    assert len(targets) == 4 and all(t["fastdml_median_s"] > 0 and t["pml_median_s"] > 0 for t in targets)


def test_report_runs_the_suites_and_writes_table_json_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    r = _run(
        [
            "-m",
            "bench.report",
            "--sizes=24,48",
            "--families=contrastive",
            "--labels=random10",
            "--modes=fwdbwd",
            "--target-s=0.01",
            "--device=cpu",
            f"--out={out}",
        ],
        FASTDML_BENCH_TINY="1",
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert (out / "bench.json").exists() and (out / "bench_cpu.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    # one row per N, with fastdml's time and the speed-up against both baselines
    rows = [line for line in report.splitlines() if line.startswith("| ContrastiveLoss | fwdbwd | random10 |")]
    assert len(rows) == 2, report
    assert all(row.count("x |") >= 3 for row in rows), report


def test_a_baseline_that_cannot_fit_is_recorded_with_its_prediction_not_run(tmp_path):
    records = tmp_path / "records.json"
    r = _run(
        [
            "-m",
            "pytest",
            "bench/test_bench_all_triplets.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-disable",
            "--bench-sizes=4096",
            "--bench-impls=pml",
            "--bench-labels=random10",
            "--bench-modes=fwdbwd",
            "--bench-device=cpu",
            f"--bench-records={records}",
        ],
        FASTDML_BENCH_MEM_LIMIT_GB="20",
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    rec = json.loads(records.read_text())["records"]
    assert len(rec) == 1 and rec[0]["status"] == "skipped"
    # 10 classes at N = 4096: ~6.2e9 triplets, three int64 index lists alone are ~150 GB
    assert rec[0]["predicted_bytes"] > 1.4e11
    assert "predicted peak" in rec[0]["reason"]


def test_cpu_memory_meter_sees_a_known_allocation():
    code = (
        "import torch\n"
        "from bench import _memory\n"
        "assert _memory.hwm_supported()\n"
        "_memory.reset_hwm(); base = _memory.rss_bytes()\n"
        "t = torch.ones(50_000_000, dtype=torch.float32)\n"  # 200 MB, touched
        "del t\n"
        "print(_memory.hwm_bytes() - base)\n"
    )
    r = _run(["-c", code], timeout=120, MALLOC_MMAP_THRESHOLD_="131072")
    if r.returncode != 0 and "hwm_supported" in r.stderr:
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    assert r.returncode == 0, r.stderr[-2000:]
    growth = float(r.stdout.strip().splitlines()[-1])
    assert 0.95 * 200e6 <= growth <= 1.10 * 200e6


def test_suites_run_without_pytest_benchmark_through_the_stand_in(tmp_path):
    out = tmp_path / "shim.json"
    r = _run(
        [
            "-m",
            "pytest",
            "bench/test_bench_contrastive.py",
            "bench/test_bench_floor.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:benchmark",
            "--bench-sizes=24",
            "--bench-labels=random10",
            "--bench-modes=fwdbwd",
            "--bench-target-s=0.01",
            f"--benchmark-json={out}",
        ],
        FASTDML_BENCH_TINY="1",
        FASTDML_BENCH_SHIM="1",
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    impls = {b["extra_info"].get("impl") for b in data["benchmarks"] if "impl" in b["extra_info"]}
    assert impls == {"fastdml", "reference", "pml"}
    assert all(b["stats"]["rounds"] >= 1 and b["stats"]["median"] > 0 for b in data["benchmarks"])
    assert any(b["extra_info"].get("kind") == "gemm_floor" for b in data["benchmarks"])
