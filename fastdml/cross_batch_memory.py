"""Kept so that ``from fastdml.cross_batch_memory import CrossBatchMemory`` works: the class lives in
:mod:`fastdml.losses.cross_batch_memory` (as PML's ``losses.CrossBatchMemory``)."""

from .losses.cross_batch_memory import CrossBatchMemory

__all__ = ["CrossBatchMemory"]
