"""fastdml's counterpart of ``pytorch_metric_learning.utils.common_functions``: the global statistics switch.

``COLLECT_STATS`` (default False) is what ``collect_stats=None`` means for fastdml's losses, miners, distances
and reducers, as PML's own switch is for PML's; PML's switch is honoured too, when PML has been imported (it is
never imported here: that costs about half a second)::

    from fastdml.utils import common_functions as c_f
    c_f.COLLECT_STATS = True    # or pytorch_metric_learning.utils.common_functions.COLLECT_STATS = True

Like PML, the switch is read when an object is constructed. Statistics are computed from the materialized
matrix and the listed terms, as PML computes them, so an object that collects them takes the general path.
"""

from __future__ import annotations

import sys

COLLECT_STATS = False


def resolve_collect_stats(collect_stats) -> bool:
    """``collect_stats`` as given, else (None) fastdml's ``COLLECT_STATS`` or PML's, if PML is imported."""
    if collect_stats is not None:
        return bool(collect_stats)
    if COLLECT_STATS:
        return True
    pml = sys.modules.get("pytorch_metric_learning.utils.common_functions")
    return bool(getattr(pml, "COLLECT_STATS", False))
