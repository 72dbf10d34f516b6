"""``python -m fastdml``: passes on the CPU, fails (exit status 1) on a wrong number, its JSON, its flags."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastdml import benchmark, selfcheck
from fastdml.__main__ import CHECK_SIZES, fp32_precision, main, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(args, env=None, code=None, timeout=300):
    """Run the command (or ``python -c code`` with args as sys.argv) from ROOT; returns the completed process."""
    cmd = [sys.executable, "-m", "fastdml", *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_command_passes_on_the_cpu(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    proc = _command(["--device", "cpu", "--json", str(out), "--markdown", str(md)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "self-check PASSED" in proc.stdout
    report = json.loads(out.read_text())
    # the schema
    assert report["schema"] == 1 and report["passed"] is True and report["failures"] == []
    for key in ("fastdml", "python", "torch", "cuda", "driver", "triton", "cpu", "gpus"):
        assert key in report["versions"]
    assert report["versions"]["torch"] == torch.__version__
    assert [r["path"] for r in report["device_table"]][:2] == ["triton", "triton"]
    cpu = report["paths"]["cpu"]
    assert cpu["backend"] == "blocked" and cpu["native"] and cpu["fp32_precision"]
    assert {r["case"] for r in cpu["cases"]} == {c.name for c in selfcheck.CASES}
    for row in cpu["cases"]:
        assert row["error"] is None and row["backend"] == "blocked" and row["calls"], row
        assert all(c.split(".")[0] in ("ops", "blocked", "portable", "reference", "kernels") for c in row["calls"])
    checks = report["checks"]
    assert {c["case"] for c in checks} == {c.name for c in selfcheck.CASES}
    assert {c["n"] for c in checks} == {n for n, _ in CHECK_SIZES["cpu"]}
    assert all(c["passed"] and c["target"] == "cpu" and c["backend"] == "blocked" for c in checks)
    losses = [c for c in checks if c["extra"]["kind"] != "miner" and c["against"] == "reference"]
    assert losses and all(0 <= c["worst_ratio"] <= 1 and c["grad_err"] is not None for c in losses)
    assert report["timing"] == []
    text = md.read_text()
    assert "| PASS | cpu | ieee | ContrastiveLoss |" in text and "## Devices" in text


def test_an_injected_error_fails_the_command(tmp_path):
    # the reference's contrastive sums (not the counts) off by 1%: the checks against it fail
    code = (
        "import sys, torch, fastdml.reference as r\n"
        "orig = r.contrastive_stats\n"
        "off = torch.tensor([1.01, 1.0, 1.01, 1.0], dtype=torch.float64)\n"
        "r.contrastive_stats = lambda *a: orig(*a) * off.to(a[0].device)\n"
        "from fastdml.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "r.json"
    proc = _command(["--device", "cpu", "--cases", "ContrastiveLoss", "--json", str(out)], code=code)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "self-check FAILED" in proc.stdout and "FAILED: check cpu ieee ContrastiveLoss" in proc.stdout
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["failures"]
    failed = {(c["case"], c["against"]) for c in report["checks"] if not c["passed"]}
    assert ("ContrastiveLoss", "reference") in failed
    # PML (where installed) is an independent oracle: fastdml itself is right
    assert not any(who == "pml" for _, who in failed)


def test_a_raising_case_fails_in_process(monkeypatch, tmp_path):
    from fastdml import losses

    def broken(self, *args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(losses.SemiHardTripletLoss, "forward", broken)
    out = tmp_path / "r.json"
    assert main(["--device", "cpu", "--cases", "SemiHard", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert all(not c["passed"] and "injected" in c["detail"] for c in report["checks"])


def test_flags_are_checked():
    for bad in (["--precision", "fp8"], ["--sizes", "a,b"], ["--sizes", "1"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2
    args = parse_args(["--sizes", "256,1024", "--precision", "ieee,tf32x3", "--device", "cpu", "--bench"])
    assert args.sizes == [256, 1024] and args.precision == ["ieee", "tf32x3"] and args.bench


def test_usage_errors_exit_2(capsys):
    assert main(["--device", "cpu", "--cases", "NoSuchLoss"]) == 2
    assert main(["--device", "cuda", "--interpret"]) == 2
    if not torch.cuda.is_available():
        assert main(["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().out


def test_ieee_is_always_settable_and_the_environment_is_restored(monkeypatch):
    monkeypatch.delenv("FASTDML_FP32_PRECISION", raising=False)
    with fp32_precision("ieee") as took:
        assert took and os.environ["FASTDML_FP32_PRECISION"] == "ieee"
    assert "FASTDML_FP32_PRECISION" not in os.environ


def test_the_cpu_times_ieee_only(tmp_path):
    out = tmp_path / "t.json"
    args = ["--device", "cpu", "--no-check", "--bench", "--sizes", "24", "--precision", "tf32x3", "--json", str(out)]
    assert main(args) == 0
    rows = json.loads(out.read_text())["timing"]
    families = {r["family"] for r in rows}
    assert families == set(benchmark.FAMILIES) | {"gemm_floor"}
    assert {r["precision"] for r in rows} == {"ieee"} and {r["n"] for r in rows} == {24}
    fast = [r for r in rows if r["impl"] == "fastdml"]
    assert len(fast) == len(benchmark.FAMILIES)
    assert all(r["ms"] > 0 and r["loss"] is not None and r["backend"] == "blocked" for r in fast)
    floor = [r for r in rows if r["impl"] == "floor"]
    assert len(floor) == 1 and floor[0]["ms"] > 0


def test_the_timing_table_skips_and_records_instead_of_failing(monkeypatch):
    monkeypatch.setattr(benchmark, "device_memory_bytes", lambda device: 2**20)
    rows = benchmark.run_table("cpu", [64], families=["contrastive"], impls=["fastdml"])
    assert len(rows) == 1 and rows[0].ms is None and rows[0].note.startswith("skipped: predicted")

    monkeypatch.setattr(benchmark, "device_memory_bytes", lambda device: None)
    real = benchmark.build

    def build(impl, family):
        if impl == "fastdml":
            return lambda x, y: (_ for _ in ()).throw(ValueError("boom"))
        return real(impl, family)

    monkeypatch.setattr(benchmark, "build", build)
    rows = benchmark.run_table("cpu", [32], families=["contrastive"], impls=["floor", "fastdml"])
    assert [r.impl for r in rows] == ["floor", "fastdml"]
    assert rows[0].ms > 0 and rows[1].note == "error: ValueError: boom"
    text = benchmark.markdown(rows)
    assert "| cpu | ieee | 32 | contrastive | fastdml | - |" in text and "boom" in text


def test_a_fastdml_timing_error_fails_the_command(monkeypatch):
    real = benchmark.build
    monkeypatch.setattr(benchmark, "build", lambda impl, family: 1 / 0 if impl == "fastdml" else real(impl, family))
    assert main(["--device", "cpu", "--no-check", "--bench", "--sizes", "16"]) == 1


def test_the_timing_step_returns_the_loss_and_a_median():
    x = torch.randn(20, 8, requires_grad=True)
    res = benchmark.time_step(lambda a, b: (a * a).sum(), x, None, repeats=3, target_s=10)
    assert (
        res["repeats"] == 3 and res["ms"] > 0 and res["loss"] == pytest.approx(float((x * x).sum().detach()), rel=1e-6)
    )
    assert x.grad is None  # cleared after every call


def test_the_time_guard_stops_a_hung_case():
    import time

    with pytest.raises(benchmark.CaseTimeout):
        with benchmark.time_guard(0.2):
            time.sleep(5)


def test_interpret_checks_the_kernels_on_cpu_tensors(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the command must set it itself
    out = tmp_path / "r.json"
    proc = _command(["--device", "cpu", "--interpret", "--cases", "BatchHardMiner", "--json", str(out)], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    interp = [c for c in report["checks"] if c["target"] == "cpu (triton interpreter)"]
    assert interp and all(c["backend"] == "triton" and c["passed"] for c in interp)
    paths = {r["case"]: r for r in report["paths"]["cpu (triton interpreter)"]["cases"]}
    assert paths["BatchHardMiner"]["calls"] == ["ops.row_hardest", "kernels.row_hardest"]


def test_an_interrupted_run_keeps_what_it_measured(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(selfcheck, "run_checks", interrupted)
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    assert main(["--device", "cpu", "--cases", "BatchHardMiner", "--json", str(out), "--markdown", str(md)]) == 1
    report = json.loads(out.read_text())
    assert report["interrupted"] is True and report["passed"] is False and report["paths"]["cpu"]["cases"]
    assert "## Paths on cpu" in md.read_text()
