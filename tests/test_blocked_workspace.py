"""The blocked path's workspace (:mod:`fastdml.blocked.workspace`): buffers kept from call to call.

What they hold between calls must never matter (every op writes a buffer before reading it), each thread has
its own, and ``release`` gives the memory back.
"""

import math
import threading

import pytest
import torch

from fastdml import blocked, config
from fastdml.blocked import workspace
from fastdml.config import memory_budget

from .blocked_cases import TRIPLET_CONFIGS, make_inputs

INF = math.inf


def _poison_all():
    """Fill every buffer of this thread with values no op may read before writing."""
    for (_slot, dtype), buf in workspace._buffers().items():
        if dtype.is_floating_point:
            buf.fill_(math.nan)
        elif dtype == torch.bool:
            buf.fill_(True)
        else:
            buf.fill_(-(2**40))


OPS = {
    "triplet_default": lambda *a: blocked.triplet_stats_fwd(*a, "l2", *TRIPLET_CONFIGS["all_avgnonzero"], True),
    "triplet_two_uppers": lambda *a: blocked.triplet_stats_fwd(*a, "l2", *TRIPLET_CONFIGS["two_uppers"], True),
    "triplet_window": lambda *a: blocked.triplet_stats_fwd(*a, "l2", *TRIPLET_CONFIGS["threshold_window"], True),
    "semihard": lambda *a: blocked.semihard_stats_fwd(*a, "l2", 0.2, True),
}


@pytest.mark.parametrize("square", [True, False], ids=["square", "rect"])
@pytest.mark.parametrize("op", list(OPS))
def test_results_do_not_depend_on_what_the_buffers_held(op, square):
    x, y, r, z, excl = make_inputs(53, 6, torch.float32, square, seed=31)
    with memory_budget(0.01):  # several blocks: buffers are reused within the call as well
        workspace.release()
        first = OPS[op](x, y, r, z, excl)
        assert workspace.held_bytes() > 0, "the op kept no buffer: this test would prove nothing"
        _poison_all()
        second = OPS[op](x, y, r, z, excl)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_buffers_are_reused_from_call_to_call():
    x, y, *_ = make_inputs(64, 8, torch.float32, seed=32)
    workspace.release()
    OPS["triplet_default"](x, y, None, None, None)
    before = {k: (b.data_ptr(), b.numel()) for k, b in workspace._buffers().items()}
    OPS["triplet_default"](x, y, None, None, None)
    after = {k: (b.data_ptr(), b.numel()) for k, b in workspace._buffers().items()}
    assert before and before == after


def test_a_larger_request_grows_the_buffer_and_a_smaller_one_reuses_it():
    workspace.release()
    small = workspace.take("test.slot", (4, 5), torch.float32, "cpu")
    big = workspace.take("test.slot", (40, 50), torch.float32, "cpu")
    assert big.shape == (40, 50) and big.is_contiguous()
    assert workspace.held_bytes() == 40 * 50 * 4  # the smaller buffer was dropped, not kept beside it
    again = workspace.take("test.slot", (3, 7), torch.float32, "cpu")
    assert again.data_ptr() == big.data_ptr() and again.shape == (3, 7)
    assert small.shape == (4, 5)
    workspace.release()


def test_slots_of_different_dtypes_are_separate_buffers():
    workspace.release()
    a = workspace.take("test.slot", (10,), torch.float32, "cpu")
    b = workspace.take("test.slot", (10,), torch.int64, "cpu")
    assert a.dtype == torch.float32 and b.dtype == torch.int64
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    workspace.release()


def test_threads_get_their_own_buffers():
    workspace.release()
    mine = workspace.take("test.slot", (100,), torch.float32, "cpu")
    seen = {}

    def worker():
        seen["ptr"] = workspace.take("test.slot", (100,), torch.float32, "cpu").data_ptr()
        seen["held"] = workspace.held_bytes()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["ptr"] != mine.data_ptr() and seen["held"] == 400
    workspace.release()


def test_release_frees_the_buffers():
    x, y, *_ = make_inputs(64, 8, torch.float32, seed=33)
    OPS["semihard"](x, y, None, None, None)
    assert workspace.held_bytes() > 0
    config.release_workspace()
    assert workspace.held_bytes() == 0


def test_other_devices_get_fresh_tensors_and_nothing_is_kept():
    workspace.release()
    t = workspace.take("test.slot", (8, 8), torch.float32, "meta")
    assert t.device.type == "meta" and t.shape == (8, 8)
    assert workspace.held_bytes() == 0


def test_what_the_buffers_keep_between_calls_stays_within_twice_the_budget():
    """Blocks are planned within the budget, so every op's buffers are too; different ops (and windows) use
    different buffers, which together stay within twice the budget."""
    x, y, *_ = make_inputs(1500, 16, torch.float32, seed=34)
    mb = 4.0
    workspace.release()
    with memory_budget(mb):
        for op in OPS.values():
            op(x, y, None, None, None)
    held = workspace.held_bytes()
    assert 0.25 * mb * 2**20 < held <= 2 * mb * 2**20, f"held {held / 2**20:.2f} MB"
    workspace.release()
