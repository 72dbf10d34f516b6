"""fastdml's benchmarks: pytest-benchmark suites (one file per loss family) and the report.

- ``bench/test_bench_<family>.py``: the timed cases, parametrized over implementation x N x D x dtype x
  label pattern x mode (forward+backward, forward alone); see :mod:`bench._cases`.
- ``bench/test_bench_floor.py``: the GEMM floor (``torch.mm(X, X.T)`` forward+backward) at the same shapes.
- ``bench/test_bench_targets.py``: the headline ratios (drop-in API against PML, alternating runs), with the
  targets and the protocol in ``bench/targets.py``.
- ``python -m bench.report`` (``make bench``): runs the suites, saves the JSON, prints the ratio tables,
  draws the chart, and updates ``bench/RESULTS.md``.
- ``python -m bench.calibrate``: re-derives the per-unit time costs the suites use to skip slow baselines.
- ``bench/experiments/``: investigations behind figures in ``bench/RESULTS.md`` (not part of ``make bench``).
- GPU tools: ``bench/gpu_check.sh``, ``bench/gpu_parity.py``, ``bench/compile_check.py``,
  ``bench/fetch_wheels.sh``.

CI runs the same files with ``--benchmark-disable`` on tiny sizes (``FASTDML_BENCH_TINY=1``) so they stay
correct; nothing here asserts a speed.
"""
