"""The compiled helpers' cache and entry points under damage and hostile arguments (fastdml/blocked/native.py).

Every case runs in a child process: a crash (SIGBUS, SIGSEGV, heap corruption) fails the test instead of
killing pytest. Each child gets its own cache directory.
"""

import ctypes.util
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from fastdml.blocked import native

needs_cc = pytest.mark.skipif(native._compiler()[0] is None, reason="no C compiler")

# a batch-hard call through the blocked path (the strip scan and the compiled chosen-triplet loss) against the
# reference, then the helpers' status
_CALL = """
import torch
from fastdml import losses, miners
from fastdml.dispatch import use_backend
from fastdml import reference
from fastdml.blocked import native
x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True); y = torch.randint(0, 4, (40,))
loss = losses.TripletMarginLoss(margin=0.2)(x, y, miners.BatchHardMiner()(x, y))
with use_backend("reference"):
    want = losses.TripletMarginLoss(margin=0.2)(x, y, miners.BatchHardMiner()(x, y))
assert torch.allclose(loss, want), (loss, want)
print(native.status())
"""


def _run(tmp_path, code=_CALL, **env):
    full = {**os.environ, "FASTDML_CACHE_DIR": str(tmp_path / "cache"), **env}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout.strip()


def _built(tmp_path):
    files = sorted((tmp_path / "cache" / "native").glob("*.so"))
    assert len(files) == 1, files
    return files[0]


def _other_shared_library():
    name = ctypes.util.find_library("m") or ctypes.util.find_library("c")
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"):
        if name and os.path.exists(os.path.join(d, name)):
            return open(os.path.join(d, name), "rb").read()
    pytest.skip("no system shared library to copy")


@needs_cc
@pytest.mark.parametrize("damage", ["truncated", "garbage", "another-library", "empty"])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, damage):
    assert _run(tmp_path) == "on"
    so = _built(tmp_path)
    good = so.read_bytes()
    bad = {
        "truncated": good[: len(good) // 3],
        "garbage": bytes((i * 37 + 11) % 256 for i in range(len(good))),
        "another-library": _other_shared_library() if damage == "another-library" else b"",
        "empty": b"",
    }[damage]
    so.write_bytes(bad)
    status = _run(tmp_path)
    assert status.startswith("on (rebuilt "), status
    assert so.read_bytes() == good or native._digest(so) == so.with_name(so.name + ".sha256").read_text().strip()
    assert _run(tmp_path) == "on"  # the rebuilt file now passes its check


@needs_cc
def test_a_missing_digest_record_means_a_rebuild(tmp_path):
    assert _run(tmp_path) == "on"
    so = _built(tmp_path)
    so.with_name(so.name + ".sha256").unlink()
    assert _run(tmp_path).startswith("on (rebuilt "), "a file without its record was loaded"


@needs_cc
def test_cc_with_words_is_split_like_a_shell(tmp_path):
    cc = native._compiler()[0][0]
    assert _run(tmp_path, CC=f"{cc} -O0") == "on"


_FAKE_CC = """#!{python}
import sys
args = sys.argv[1:]
if "--version" in args:
    print("fake-cc 1.0"); sys.exit(0)
with open({count!r}, "a") as f:
    f.write("compile\\n")
out = args[args.index("-o") + 1]
import os
os.unlink(out)  # as gcc does when it fails: removes its partial output
sys.stderr.write("fatal error: error writing to -: No space left on device\\n")
sys.exit(1)
"""


def test_a_full_disk_is_reported_and_the_failed_build_is_remembered(tmp_path):
    count = tmp_path / "compiles"
    cc = tmp_path / "fake-cc"
    cc.write_text(_FAKE_CC.format(python=sys.executable, count=str(count)))
    cc.chmod(0o755)
    status = _run(tmp_path, CC=str(cc))
    assert status.startswith("unavailable: ") and "No space left on device" in status, status
    assert count.read_text().count("compile") == 1  # not once per flag set
    status = _run(tmp_path, CC=str(cc))  # a later process does not retry the failed build
    assert "an earlier build failed" in status and "No space left on device" in status, status
    assert count.read_text().count("compile") == 1


_HOSTILE = """
import ctypes, torch
from fastdml.blocked import native
lib = native._library()
assert lib is not None, native.status()
# every entry point rejects bad offsets and sizes before it reads a pointer (all pointers are NULL here)
calls = {
    "fastdml_row_hardest_f32": (0, -1, 4, 0, 0, 0, -1, 0, 0, 0, 0),
    "fastdml_row_hardest_f64": (0, 4, -1, 0, 0, 0, -1, 0, 0, 0, 0),
    "fastdml_row_hardest_strip_f32": (0, 4, 8, -3, 0, -2.0, 0, 0, 0, 0, 0),
    "fastdml_row_hardest_strip_f64": (0, 9, 8, 0, 0, -2.0, 0, 0, 0, 0, 0),
    "fastdml_chosen_triplets_f32": (0, -2, 3, 0, 4, 0, 0, 0, 0, 0.1, 0, -1.0, 1.0, 0, 0, 0, 0),
    "fastdml_chosen_triplets_f64": (0, 2, 3, 0, 4, 0, 0, 0, 7, 0.1, 0, -1.0, 1.0, 0, 0, 0, 0),
}
for name, args in calls.items():
    assert getattr(lib, name)(*args) == -1, name
# the Python wrapper: a negative start with otherwise consistent shapes
N, b = 16, 4
G = torch.zeros(b, N + 3)
y = torch.zeros(N, dtype=torch.int32)
try:
    native.row_hardest_strip(G, -3, torch.zeros(N), -2.0, y, torch.zeros(N), torch.zeros(N, dtype=torch.int32),
                             torch.zeros(N), torch.zeros(N, dtype=torch.int32))
except ValueError as exc:
    assert "s must be" in str(exc), exc
else:
    raise AssertionError("a negative start was accepted")
print("ok")
"""


@needs_cc
def test_every_entry_point_rejects_bad_offsets_and_sizes(tmp_path):
    assert _run(tmp_path, _HOSTILE) == "ok"


def test_the_ctypes_types_come_from_the_header_the_sources_include():
    table = native._prototypes()
    assert set(table) >= {f"fastdml_{f}_{t}" for f in ("row_hardest", "row_hardest_strip", "chosen_triplets")
                          for t in ("f32", "f64")}  # fmt: skip
    assert table["fastdml_row_scan_version"] == []
    assert len(table["fastdml_chosen_triplets_f32"]) == 17
    for src in native._SOURCES:
        assert '#include "fastdml_native.h"' in src.read_text()


def test_disabled_is_per_thread():
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other():
        inside.wait(10)
        seen["other"] = native._switched_off()
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with native.disabled():
        seen["here"] = native._switched_off()
        inside.set()
        release.wait(10)
    t.join()
    assert seen["here"] is not None
    assert seen["other"] is None or "disabled()" not in seen["other"]
