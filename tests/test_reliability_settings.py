"""Settings under hostile values and threads: the memory budget rejects inf/NaN by name, and every setting a
``with`` block changes (memory_budget, native.disabled, use_backend) is seen by the calling thread only."""

import math
import threading

import pytest

from fastdml import config
from fastdml.blocked import native
from fastdml.dispatch import use_backend


@pytest.mark.parametrize("raw", ["inf", "nan", "-inf", "1e400", "0", "-3"])
def test_env_budget_that_is_not_a_positive_finite_number_is_a_clear_error(monkeypatch, raw):
    monkeypatch.setenv("FASTDML_MEMORY_BUDGET_MB", raw)
    with pytest.raises(ValueError, match="FASTDML_MEMORY_BUDGET_MB"):
        config.memory_budget_bytes()


@pytest.mark.parametrize("mb", [math.inf, math.nan, -math.inf, 0.0, -1.0, "abc"])
def test_memory_budget_block_rejects_non_finite_megabytes_by_name(mb):
    with pytest.raises(ValueError, match="megabytes"):
        with config.memory_budget(mb):
            pass


def _in_two_threads(enter, read):
    """Thread A inside ``enter(a)``, thread B inside ``enter(b)`` at the same time; what each reads there."""
    seen = {}
    both_in = threading.Barrier(2, timeout=10)

    def run(name, value):
        with enter(value):
            both_in.wait()
            seen[name] = read()
            both_in.wait()

    threads = [threading.Thread(target=run, args=("a", 500.0)), threading.Thread(target=run, args=("b", 1.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen


def test_memory_budget_is_per_thread():
    seen = _in_two_threads(config.memory_budget, config.memory_budget_bytes)
    assert seen == {"a": 500 * 2**20, "b": 2**20}


def test_native_disabled_is_per_thread():
    seen = _in_two_threads(lambda v: native.disabled(v == 1.0), native._switched_off)
    assert seen["b"] is not None and "disabled()" in seen["b"]
    assert seen["a"] is None or "disabled()" not in seen["a"]


def test_use_backend_is_per_thread():
    from fastdml import dispatch

    seen = _in_two_threads(lambda v: use_backend("reference" if v == 1.0 else "blocked"), lambda: dispatch._stack()[-1])
    assert seen == {"a": "blocked", "b": "reference"}
