"""fastdml.kernels: the fused Triton kernels (the ``"triton"`` backend of fastdml.dispatch).

Exports the primitive-op contract of docs/ARCHITECTURE.md with exactly its signatures (each launcher also
takes a keyword-only-by-convention ``allow_tf32=False``: tf32 ``tl.dot`` for fp32 inputs is an opt-in):

    contrastive_stats_fwd(x, y, r, z, excl, kind, pos_margin, neg_margin, pos_lo, neg_hi, low, high, need_grad)
    triplet_stats_fwd(x, y, r, z, excl, kind, margin, smooth, band_lo, band_hi, low, high, need_grad)
    semihard_stats_fwd(x, y, r, z, excl, kind, margin, need_grad)
        -> (stats float64 (k_s,), gx_parts float32 (k, N, D), gr_parts float32 (k, M, D))
    row_extreme(x, y, r, z, excl, kind, side, mode, lo, hi, thr, thr_op) -> (value f32, index i64, found bool)
    row_hardest(x, y, r, z, excl, kind) -> (pos value, index, found, neg value, index, found)
    triplet_list(x, y, r, z, excl, kind, band_lo, band_hi) -> (a, p, n) int64
    pair_list(x, y, r, z, excl, kind, pos_lo, neg_hi) -> (a1, p, a2, n) int64

Inputs: float32, float16 or bfloat16 (float64 is rejected with a TypeError: the op layer sends it to the
blocked backend), CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``). All sums are accumulated in
fp32 inside a tile and float64 across tiles; counts are int64, returned as float64.
"""

from .contrastive import contrastive_stats_fwd
from .extreme import row_extreme
from .hardest import row_hardest
from .pairs import pair_list
from .triplet import semihard_stats_fwd, triplet_list, triplet_stats_fwd

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
# read by fastdml.ops: float64 inputs go to the blocked backend
SUPPORTS_FLOAT64 = False

__all__ = [
    "contrastive_stats_fwd",
    "triplet_stats_fwd",
    "semihard_stats_fwd",
    "row_extreme",
    "row_hardest",
    "triplet_list",
    "pair_list",
    "SUPPORTED_DTYPES",
    "SUPPORTS_FLOAT64",
]
