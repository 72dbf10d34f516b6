"""fastdml: fast deep metric learning for PyTorch.

A drop-in replacement for pytorch-metric-learning's losses, miners, distances and reducers::

    from fastdml import losses, miners, distances, reducers

computed in one pass over tiles of the distance matrix (fused Triton kernels on CUDA, a memory-bounded
blocked path on the CPU), forward and backward, without holding the N x N matrix.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__version__ = "0.1.0"


class _KernelsFinder:
    """Make ``fastdml.kernels`` importable from a source checkout (``PYTHONPATH=.``, as bench/gpu_check.sh).

    An installed fastdml maps the folder ``kernels/`` to ``fastdml.kernels`` (setuptools package-dir).
    From a plain checkout that mapping does not exist, so this finder (appended to ``sys.meta_path``: an
    installed mapping wins) resolves that one name to the folder; its submodules then load through the
    package's ``__path__``. Nothing is imported until ``fastdml.kernels`` is asked for, and the folder is
    never importable as a top-level ``kernels`` (a PyPI package owns that name).
    """

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "fastdml.kernels":
            return None
        folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
        init = os.path.join(folder, "__init__.py")
        if not os.path.exists(init):
            return None
        return importlib.util.spec_from_file_location("fastdml.kernels", init, submodule_search_locations=[folder])


if not any(getattr(f, "__name__", "") == "_KernelsFinder" for f in sys.meta_path):
    sys.meta_path.append(_KernelsFinder)


_SUBMODULES = (
    "distances",
    "reducers",
    "losses",
    "miners",
    "functional",
    "lazy",
    "reference",
    "metrics",
    "ops",
    "dispatch",
    "config",
    "utils",
)


def __getattr__(name):
    # submodules load on first use, so `import fastdml` stays light and has no import cycles
    if name in _SUBMODULES:
        return importlib.import_module(f"fastdml.{name}")
    if name == "use_backend":
        from .dispatch import use_backend

        return use_backend
    if name == "memory_budget":
        from .config import memory_budget

        return memory_budget
    raise AttributeError(f"module 'fastdml' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES) + ["use_backend", "memory_budget"])


__all__ = list(_SUBMODULES) + ["use_backend", "memory_budget", "__version__"]
