"""The one dispatch place: env var, context manager, validation, and the memory-budget setting."""

import pytest
import torch

import fastdml
from fastdml import config, dispatch


def test_auto_chooses_blocked_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("FASTDML_BACKEND", raising=False)
    assert dispatch.backend_for(torch.zeros(2, 2)) == "blocked"


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setenv("FASTDML_BACKEND", "reference")
    assert dispatch.backend_for(torch.zeros(2, 2)) == "reference"


def test_context_manager_overrides_env_innermost_first(monkeypatch):
    monkeypatch.setenv("FASTDML_BACKEND", "reference")
    with fastdml.use_backend("blocked"):
        assert dispatch.backend_for(torch.zeros(1, 1)) == "blocked"
        with fastdml.use_backend("reference"):
            assert dispatch.backend_for(torch.zeros(1, 1)) == "reference"
        assert dispatch.backend_for(torch.zeros(1, 1)) == "blocked"
    assert dispatch.backend_for(torch.zeros(1, 1)) == "reference"


def test_unknown_backend_names_the_setting(monkeypatch):
    with pytest.raises(ValueError, match="use_backend"):
        with fastdml.use_backend("fast"):
            pass
    monkeypatch.setenv("FASTDML_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTDML_BACKEND"):
        dispatch.backend_for(torch.zeros(1, 1))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fastdml.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            dispatch.backend_for(torch.zeros(1, 1))


def test_memory_budget_env_and_context(monkeypatch):
    monkeypatch.delenv("FASTDML_MEMORY_BUDGET_MB", raising=False)
    assert config.memory_budget_bytes() == 64 * 2**20
    monkeypatch.setenv("FASTDML_MEMORY_BUDGET_MB", "8")
    assert config.memory_budget_bytes() == 8 * 2**20
    with fastdml.memory_budget(0.5):
        assert config.memory_budget_bytes() == 2**19
    assert config.memory_budget_bytes() == 8 * 2**20
    monkeypatch.setenv("FASTDML_MEMORY_BUDGET_MB", "lots")
    with pytest.raises(ValueError, match="FASTDML_MEMORY_BUDGET_MB"):
        config.memory_budget_bytes()
    with pytest.raises(ValueError, match="megabytes"):
        with fastdml.memory_budget(0):
            pass
