"""The device table (docs/devices.md, fastdml.info.DEVICE_TABLE), row by row, against dispatch.backend_for.

No machine here has a GPU, so the tensor's device is mocked: a ``torch.Tensor`` subclass whose ``device`` and
``is_cuda`` say what a CUDA, ROCm, MPS or XPU tensor would (its data stay on the CPU; dispatch reads only
those attributes). ROCm is ``is_cuda`` with ``torch.version.hip`` set; "without Triton" mocks
``dispatch.triton_available``.
"""

import pytest
import torch

import fastdml
from fastdml import dispatch, info


class _OnDevice(torch.Tensor):
    fake = torch.device("cpu")

    @property
    def device(self):
        return type(self).fake

    @property
    def is_cuda(self):
        return type(self).fake.type == "cuda"


def on(device: str, dtype=torch.float32) -> torch.Tensor:
    """A tensor that reports ``device`` (its storage is on the CPU)."""
    cls = type(f"On_{device.replace(':', '_')}", (_OnDevice,), {"fake": torch.device(device)})
    return torch.zeros(2, 2, dtype=dtype).as_subclass(cls)


@pytest.fixture
def auto(monkeypatch):
    monkeypatch.delenv("FASTDML_BACKEND", raising=False)


def _row(name):
    rows = {r[0]: r for r in info.DEVICE_TABLE}
    assert name in rows, f"the device table has no row {name!r}"
    return rows[name]


def test_the_mock_reports_the_device():
    t = on("cuda:1")
    assert t.is_cuda and t.device == torch.device("cuda", 1) and isinstance(t, torch.Tensor)
    assert on("mps").device.type == "mps" and not on("mps").is_cuda


def test_nvidia_cuda_takes_triton(auto, monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    assert dispatch.backend_for(on("cuda")) == _row("NVIDIA GPU (CUDA)")[2] == "triton"
    assert dispatch.backend_for(on("cuda:3")) == "triton"


def test_rocm_takes_triton(auto, monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    assert dispatch.backend_for(on("cuda")) == _row("AMD GPU (ROCm)")[2] == "triton"
    assert _row("AMD GPU (ROCm)")[3] == "ieee always" and _row("AMD GPU (ROCm)")[4] == "untested"


@pytest.mark.parametrize("hip", [None, "6.2.0"])
def test_cuda_or_rocm_without_triton_takes_blocked(auto, monkeypatch, hip):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert dispatch.backend_for(on("cuda")) == _row("CUDA or ROCm without Triton")[2] == "blocked"


def test_cpu_takes_blocked(auto, monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)  # Triton installed changes nothing
    assert dispatch.backend_for(torch.zeros(2, 2)) == "blocked"
    assert _row("CPU")[2].startswith("blocked")


@pytest.mark.parametrize("device", ["mps", "xpu", "meta", "hpu"])
@pytest.mark.parametrize("triton", [True, False])
def test_other_devices_take_blocked(auto, monkeypatch, device, triton):
    monkeypatch.setattr(dispatch, "triton_available", lambda: triton)
    assert dispatch.backend_for(on(device)) == _row("MPS, XPU and other devices")[2] == "blocked"


def test_an_override_wins_on_every_device(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv("FASTDML_BACKEND", "reference")
    for device in ("cuda", "mps", "cpu"):
        assert dispatch.backend_for(on(device)) == "reference"
    monkeypatch.delenv("FASTDML_BACKEND")
    with fastdml.use_backend("blocked"):
        assert dispatch.backend_for(on("cuda")) == "blocked"


def test_path_for_names_the_row_and_why(auto):
    p = info.path_for("cpu")
    assert p["backend"] == "blocked" and p["row"] == "CPU" and "CPU" in p["why"]
    assert p["native"] is not None and p["native"].split(":")[0] in ("on", "off", "unavailable")
    with fastdml.use_backend("reference"):
        q = info.path_for("cpu")
    assert q["backend"] == "reference" and q["row"] == "override"


def test_path_for_float64_on_the_triton_path_is_blocked(auto, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with fastdml.use_backend("triton"):
        assert info.path_for("cpu", torch.float32)["backend"] == "triton"
        p = info.path_for("cpu", torch.float64)
    assert p["backend"] == "blocked" and "float64" in p["why"]


def test_the_table_in_the_docs_is_the_table_in_the_code():
    import os

    doc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "devices.md")
    if not os.path.exists(doc):
        pytest.skip("docs/devices.md is not shipped with the installed package")
    with open(doc) as f:
        text = f.read()
    assert info.device_table_markdown().split("\n\n")[0] in text
