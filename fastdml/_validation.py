"""Input checks for the public API: clear errors that name the argument, never a crash deep inside.

Where PML accepts an input, these accept it the same way: labels of any real dtype (integer, bool or
floating: PML compares them with ``==``), labels on another device (moved to the embeddings' device),
``labels=None`` together with an ``indices_tuple``.
"""

from __future__ import annotations

import math
import numbers

import torch


def check_embeddings(emb, name: str = "embeddings") -> torch.Tensor:
    """``emb`` must be a 2-D floating-point tensor (N, D)."""
    if not isinstance(emb, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(emb).__name__}")
    if emb.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor of shape (N, D), got shape {tuple(emb.shape)}")
    if not emb.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {emb.dtype}")
    return emb


def check_ref(embeddings: torch.Tensor, ref_emb, name: str = "ref_emb") -> torch.Tensor:
    """``ref_emb`` must be 2-D floating, with the embeddings' width, device and dtype."""
    check_embeddings(ref_emb, name)
    if ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"{name} must have the embeddings' width {embeddings.shape[1]}, got shape {tuple(ref_emb.shape)}"
        )
    if ref_emb.device != embeddings.device:
        raise ValueError(f"{name} is on {ref_emb.device} but embeddings are on {embeddings.device}")
    if ref_emb.dtype != embeddings.dtype:
        raise TypeError(f"{name} has dtype {ref_emb.dtype} but embeddings have dtype {embeddings.dtype}")
    return ref_emb


def check_labels(labels, n: int, name: str = "labels") -> torch.Tensor:
    """``labels`` must be a 1-D tensor of length ``n`` with a real dtype (integer, bool or floating)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D torch.Tensor of length {n}, got {type(labels).__name__}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor of shape ({n},), got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has length {labels.shape[0]} but there are {n} embeddings")
    if labels.is_complex():
        raise TypeError(f"{name} must have a real dtype (integer, bool or floating), got {labels.dtype}")
    # (a traced graph cannot branch on data: compiled, a NaN label gets a code of its own, equal to none)
    if labels.is_floating_point() and not torch.compiler.is_compiling() and bool(torch.isnan(labels).any()):
        raise ValueError(f"{name} contains NaN: a NaN label equals no label, not even itself")
    return labels


def _equality_codes(v: torch.Tensor) -> torch.Tensor:
    """int64 codes with ``codes_i == codes_j`` iff ``v_i == v_j`` (a NaN label equals nothing, as in PML), by a
    sort: every shape is static, so ``torch.compile(fullgraph=True)`` traces it (``torch.unique`` would not)."""
    s, order = torch.sort(v, stable=True)
    new = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    new[1:] = s[1:] != s[:-1]
    codes = torch.cumsum(new.to(torch.int64), 0) - 1
    return torch.empty_like(codes).scatter_(0, order, codes)


def labels_as_int64(y: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels as int64 class ids for the ops, preserving equality exactly (y_i == z_j iff ids equal).

    Integer and bool labels are copied as int64 (values kept); floating labels are mapped to equality codes
    over both tensors together. The result never shares memory with the caller's labels, so a miner's result
    is fixed when it is mined (as PML's), whatever happens to the labels afterwards.
    """
    int_types = (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
    if y.dtype in int_types and (z is None or z.dtype in int_types):
        return y.to(torch.int64, copy=True), None if z is None else z.to(torch.int64, copy=True)
    if z is None:
        return _equality_codes(y), None
    common = torch.promote_types(y.dtype, z.dtype)
    inv = _equality_codes(torch.cat([y.to(common), z.to(common)]))
    return inv[: y.shape[0]], inv[y.shape[0] :]


def move_labels(labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """PML's ``to_device``: the same object when it already is on ``device``."""
    return labels if labels.device == device else labels.to(device)


def check_indices_tuple(indices_tuple, n: int, m: int, device: torch.device, name: str = "indices_tuple"):
    """A tuple/list of 3 (a, p, n) or 4 (a1, p, a2, n) 1-D integer tensors; anchors index the N embeddings,
    the others the M references. Returns a tuple of int64 tensors on ``device``."""
    if not isinstance(indices_tuple, (tuple, list)):
        raise TypeError(
            f"{name} must be a tuple of 3 (a, p, n) or 4 (a1, p, a2, n) index tensors, "
            f"got {type(indices_tuple).__name__}"
        )
    k = len(indices_tuple)
    if k not in (3, 4):
        raise ValueError(f"{name} must have 3 (a, p, n) or 4 (a1, p, a2, n) tensors, got {k}")
    out = []
    for pos, t in enumerate(indices_tuple):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{pos}] must be a torch.Tensor of indices, got {type(t).__name__}")
        if t.ndim != 1:
            raise ValueError(f"{name}[{pos}] must be 1-D, got shape {tuple(t.shape)}")
        # (the dtype first: a traced tensor's size may be known only when the graph runs)
        if (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool) and t.numel():
            raise TypeError(f"{name}[{pos}] must hold integer indices, got dtype {t.dtype}")
        out.append(t.to(device=device, dtype=torch.int64))
    groups = [(0, 1, 2)] if k == 3 else [(0, 1), (2, 3)]
    for g in groups:
        if torch.compiler.is_compiling():
            # sizes may be data (a listed tuple): asserted when the graph runs
            for i in g[1:]:
                same = out[i].shape[0] == out[g[0]].shape[0]
                torch._check(same, lambda g=g: f"{name}: tensors {g} must have the same length")
            continue
        lens = {out[i].shape[0] for i in g}
        if len(lens) > 1:
            raise ValueError(f"{name}: tensors {g} must have the same length, got {[out[i].shape[0] for i in g]}")
    anchors = (0,) if k == 3 else (0, 2)
    for pos, t in enumerate(out):
        bound = n if pos in anchors else m
        if torch.compiler.is_compiling():
            # the range is data: a traced graph asserts it when it runs (a Python branch on it would break the
            # graph); empty tensors pass
            # (a message without sizes: they may be symbolic while traced)
            what = "embeddings" if pos in anchors else "reference embeddings"
            torch._assert_async(((t >= 0) & (t < bound)).all(), name + f"[{pos}] has indices outside the " + what)
            continue
        if t.numel() == 0:
            continue
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= bound:
            what = "embeddings" if pos in anchors else "reference embeddings"
            raise ValueError(f"{name}[{pos}] has indices in [{lo}, {hi}], outside the {bound} {what}")
    return tuple(out)


def check_choice(value, choices, name: str):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_number(value, name: str, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or (not allow_inf and math.isinf(v)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return v
