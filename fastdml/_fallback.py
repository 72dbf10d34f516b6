"""Module ``__getattr__`` fallback: names fastdml does not implement come from PML when it is installed.

``fastdml.losses.NTXentLoss`` is ``pytorch_metric_learning.losses.NTXentLoss`` (PML's own class, unchanged),
so code written against PML keeps working after ``from fastdml import losses``. Without PML installed the
lookup raises an AttributeError that lists what fastdml provides.
"""

from __future__ import annotations

import importlib


def pml_fallback(module_name: str, pml_submodule: str, name: str, provided):
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    try:
        pml = importlib.import_module(f"pytorch_metric_learning.{pml_submodule}")
    except ImportError:
        pml = None
    if pml is not None and hasattr(pml, name):
        return getattr(pml, name)
    where = (
        "pytorch-metric-learning does not have it either"
        if pml is not None
        else "install pytorch-metric-learning to use PML's implementation"
    )
    raise AttributeError(
        f"module {module_name!r} has no attribute {name!r} ({where}); fastdml provides: {', '.join(sorted(provided))}"
    )
