"""Distances, drop-in for ``pytorch_metric_learning.distances``.

Same classes, arguments, attributes and methods as PML (``normalize_embeddings``, ``p``, ``power``,
``is_inverted``, ``margin``, ``smallest_dist``, ``largest_dist``, ``normalize``, ``maybe_normalize``,
``get_norm``, ``pairwise_distance``, ``collect_stats``). Calling one, ``distance(query)`` or
``distance(query, ref)``, returns the (N, M) matrix as PML does, but the Euclidean matrix is exact near
zero distance: PML's ``torch.cdist`` uses the expansion ``|a|^2 + |b|^2 - 2 a.b`` above 25 rows, which in
float32 is off by up to ~4e-4 for near-duplicates; here entries with a small ``q`` relative to
``|a|^2 + |b|^2`` are recomputed by direct differences. The gradient at zero distance is 0 (PML's cdist
subgradient), so identical embeddings give finite gradients. In float16 ``LpDistance`` computes PML's values
bit for bit (PML's direct differences ``||a - b + 1e-6||`` in float16 ops, no cancellation to avoid there).

fastdml's losses never build this matrix for the distances that have a fused path; :func:`fused_spec` says
which ones do (for fastdml and PML distance objects alike). Any other distance (``p != 2``, other powers,
subclasses) goes through the object's own ``__call__``.

Names fastdml does not implement (e.g. ``SNRDistance``, ``BatchedDistance``) are taken from PML when it is
installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils.common_functions import resolve_collect_stats

__all__ = ["BaseDistance", "LpDistance", "DotProductSimilarity", "CosineSimilarity", "fused_spec"]

# relative size of q = |a - b|^2 below which the expansion's cancellation matters: recompute directly
_EXPANSION_REL = 1e-2


def _sq_l2_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """q_ij = |a_i - b_j|^2: the expansion, with the near-cancelling entries recomputed by direct differences.

    Entries with ``q < 1e-2 (|a_i|^2 + |b_j|^2)`` (near-duplicates) are recomputed exactly, so the relative
    error of every entry is about ``1e-7 / 1e-2 = 1e-5`` in float32 at worst; a direct-difference entry
    keeps the exact gradient ``2 (a_i - b_j)`` (0 at duplicates).
    """
    na = (a * a).sum(1)
    nb = (b * b).sum(1)
    q = na[:, None] + nb[None, :] - 2.0 * (a @ b.T)
    with torch.no_grad():
        small = q < _EXPANSION_REL * (na[:, None] + nb[None, :])
        ii, jj = torch.nonzero(small, as_tuple=True)
    if ii.numel():
        diff = a[ii] - b[jj]
        q = q.index_put((ii, jj), (diff * diff).sum(1))
    return q.clamp_min(0)


def _safe_sqrt(q: torch.Tensor) -> torch.Tensor:
    nonzero = q != 0
    return torch.where(nonzero, torch.sqrt(torch.where(nonzero, q, torch.ones_like(q))), torch.zeros_like(q))


class BaseDistance(torch.nn.Module):
    """PML's ``BaseDistance``: ``forward(query, ref=None)`` normalizes (if asked), computes the matrix with
    :meth:`compute_mat`, and raises it to ``power``."""

    def __init__(self, normalize_embeddings=True, p=2, power=1, is_inverted=False, collect_stats=None):
        super().__init__()
        self.normalize_embeddings = normalize_embeddings
        self.p = p
        self.power = power
        self.is_inverted = is_inverted
        self.collect_stats = resolve_collect_stats(collect_stats)
        if self.collect_stats:
            self.reset_stats()

    def reset_stats(self):
        """PML's hook: zero the statistics this object records."""
        if self.collect_stats:
            self.initial_avg_query_norm = 0
            self.initial_avg_ref_norm = 0
            self.final_avg_query_norm = 0
            self.final_avg_ref_norm = 0

    def forward(self, query_emb, ref_emb=None):
        """The (N, M) matrix of ``compute_mat(normalize(query), normalize(ref)) ** power`` (``ref=None``:
        ``ref = query``)."""
        self.reset_stats()
        self.check_shapes(query_emb, ref_emb)
        qn = self.maybe_normalize(query_emb)
        if ref_emb is None:
            ref_emb, rn = query_emb, qn
        else:
            rn = self.maybe_normalize(ref_emb)
        self.set_default_stats(query_emb, ref_emb, qn, rn)
        mat = self.compute_mat(qn, rn)
        if self.power != 1:
            mat = mat**self.power
        return mat

    def compute_mat(self, query_emb, ref_emb):
        """PML's hook: the (N, M) matrix of distances or similarities between ``query`` and ``ref`` rows."""
        raise NotImplementedError

    def pairwise_distance(self, query_emb, ref_emb):
        """Elementwise pair form: the distance of ``(query[t], ref[t])`` for every row ``t`` (no normalization,
        no power: as PML; but exact, without the 1e-6 that PML's ``F.pairwise_distance`` adds)."""
        raise NotImplementedError

    def smallest_dist(self, *args, **kwargs):
        """PML's hook: the minimum of ``x`` along ``dim`` (the maximum for a similarity)."""
        return torch.max(*args, **kwargs) if self.is_inverted else torch.min(*args, **kwargs)

    def largest_dist(self, *args, **kwargs):
        """PML's hook: the maximum of ``x`` along ``dim`` (the minimum for a similarity)."""
        return torch.min(*args, **kwargs) if self.is_inverted else torch.max(*args, **kwargs)

    def margin(self, x, y):
        """How much farther ``y`` is than ``x``... in PML's convention: ``x - y`` (distances), ``y - x``
        (similarities)."""
        return y - x if self.is_inverted else x - y

    def normalize(self, embeddings, dim=1, **kwargs):
        """``x / ||x||_p`` along ``dim``."""
        return F.normalize(embeddings, p=self.p, dim=dim, **kwargs)

    def maybe_normalize(self, embeddings, dim=1, **kwargs):
        """``normalize(x)`` when the distance normalizes its embeddings, else ``x``."""
        return self.normalize(embeddings, dim=dim, **kwargs) if self.normalize_embeddings else embeddings

    def get_norm(self, embeddings, dim=1, **kwargs):
        """``||x||_p`` along ``dim``."""
        return torch.norm(embeddings, p=self.p, dim=dim, **kwargs)

    def set_default_stats(self, query_emb, ref_emb, qn, rn):
        """PML's hook: record the average query and reference norms (when collecting statistics)."""
        if self.collect_stats:
            with torch.no_grad():
                self.initial_avg_query_norm = torch.mean(self.get_norm(query_emb)).item()
                self.initial_avg_ref_norm = torch.mean(self.get_norm(ref_emb)).item()
                self.final_avg_query_norm = torch.mean(self.get_norm(qn)).item()
                self.final_avg_ref_norm = torch.mean(self.get_norm(rn)).item()

    def check_shapes(self, query_emb, ref_emb):
        """PML's hook: raise unless ``query`` and ``ref`` are 2-D with the same number of columns."""
        if query_emb.ndim != 2 or (ref_emb is not None and ref_emb.ndim != 2):
            raise ValueError("embeddings must be a 2D tensor of shape (batch_size, embedding_size)")

    def extra_repr(self):
        """The settings shown by ``repr``."""
        return f"normalize_embeddings={self.normalize_embeddings}, p={self.p}, power={self.power}"


class LpDistance(BaseDistance):
    """``|a - b|_p ** power`` (default p = 2, power = 1, L2-normalized embeddings, as PML).

    For p = 2 the matrix is exact near zero distance (see the module docstring); gradient 0 at d = 0.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.is_inverted:
            raise ValueError("LpDistance is a distance: is_inverted must be False")

    def compute_mat(self, query_emb, ref_emb):
        """``||q_i - r_j||_p`` for every pair of rows (exact near 0; float16: PML's values, see below)."""
        if ref_emb is None:
            ref_emb = query_emb
        if query_emb.dtype == torch.float16:
            return _pml_half_matrix(self, query_emb, ref_emb)
        if self.p == 2:
            q = _sq_l2_matrix(query_emb, ref_emb)
            return _safe_sqrt(q)
        dtype = query_emb.dtype
        if dtype == torch.bfloat16:
            # cdist has no bfloat16 kernels on every device: compute in float32, return the input dtype
            return torch.cdist(query_emb.float(), ref_emb.float(), p=self.p).to(dtype)
        return torch.cdist(query_emb, ref_emb, p=self.p)

    def pairwise_distance(self, query_emb, ref_emb):
        """``||q_i - r_i||_p`` of row pairs: exact, gradient 0 at d = 0 (PML's ``F.pairwise_distance`` adds
        eps = 1e-6 to every difference); float16 takes PML's ``||q_i - r_i + 1e-6||_p`` in float16 ops."""
        if query_emb.dtype == torch.float16:
            return F.pairwise_distance(query_emb, ref_emb, p=self.p)
        diff = query_emb - ref_emb
        if self.p == 2:
            return _safe_sqrt((diff * diff).sum(-1))
        return torch.linalg.vector_norm(diff, ord=self.p, dim=-1)


# elements of one row chunk's (rows x M x D) difference tensor in the float16 matrix
_HALF_CHUNK_ELEMS = 1 << 24


def _pml_half_matrix(distance, query_emb, ref_emb):
    """PML's float16 matrix, bit for bit: ``distance.pairwise_distance`` of every (query row, ref row) pair,
    in float16 ops, PML's row-major pair order, a bounded number of rows at a time.

    Float16 is where the margins of a miner fall on rounding boundaries (an 11-bit grid), so fastdml takes
    PML's exact arithmetic there and its miners select what PML's select (``fastdml.dispatch``).
    """
    n, m = query_emb.shape[0], ref_emb.shape[0]
    step = max(1, _HALF_CHUNK_ELEMS // max(1, m * query_emb.shape[1]))
    parts = []
    for s in range(0, n, step):
        e = min(n, s + step)
        q = query_emb[s:e].repeat_interleave(m, dim=0)
        r = ref_emb.repeat(e - s, 1)
        parts.append(distance.pairwise_distance(q, r).view(e - s, m))
    if not parts:
        return query_emb.new_zeros((0, m))
    return torch.cat(parts)


class DotProductSimilarity(BaseDistance):
    """``a . b`` (a similarity: ``is_inverted=True``); with PML's default ``normalize_embeddings=True`` it is the
    cosine similarity."""

    def __init__(self, **kwargs):
        kwargs.pop("is_inverted", None)
        super().__init__(is_inverted=True, **kwargs)

    def compute_mat(self, query_emb, ref_emb):
        """``q_i . r_j`` for every pair of rows."""
        return torch.matmul(query_emb, ref_emb.transpose(-1, -2))

    def pairwise_distance(self, query_emb, ref_emb):
        """``q_i . r_i`` of row pairs."""
        return torch.sum(query_emb * ref_emb, dim=1)


class CosineSimilarity(DotProductSimilarity):
    """Cosine similarity ``a . b / (|a| |b|)``: a dot product of normalized embeddings (always normalizes)."""

    def __init__(self, **kwargs):
        kwargs.pop("normalize_embeddings", None)
        super().__init__(normalize_embeddings=True, **kwargs)


def _pml_class_name(obj) -> str | None:
    mod = type(obj).__module__ or ""
    if mod.startswith("pytorch_metric_learning.distances"):
        return type(obj).__name__
    return None


def fused_spec(distance) -> tuple[str, bool] | None:
    """``(kind, normalize)`` when ``distance`` has a fused path, else None.

    ``kind`` is the ops' signed distance: ``"l2"`` for ``LpDistance(p=2, power=1)``, ``"sql2"`` for
    ``LpDistance(p=2, power=2)``, ``"dot"`` for ``DotProductSimilarity`` / ``CosineSimilarity`` (power 1).
    ``normalize``: L2-normalize the embeddings first (only p = 2 normalization is fused). fastdml's and PML's
    own classes qualify (exact classes, not subclasses, which may override the math); anything else returns
    None and is computed through the object's ``__call__``, as does a distance collecting statistics (PML
    records them from that call).
    """
    if getattr(distance, "collect_stats", False):
        return None
    cls = type(distance)
    name = None
    if cls in (LpDistance, DotProductSimilarity, CosineSimilarity):
        name = cls.__name__
    else:
        name = _pml_class_name(distance)
    if name not in ("LpDistance", "DotProductSimilarity", "CosineSimilarity"):
        return None
    p = getattr(distance, "p", None)
    power = getattr(distance, "power", None)
    normalize = bool(getattr(distance, "normalize_embeddings", False))
    if normalize and p != 2:
        return None
    if name == "LpDistance":
        if p != 2 or getattr(distance, "is_inverted", False):
            return None
        if power == 1:
            return "l2", normalize
        if power == 2:
            return "sql2", normalize
        return None
    if power != 1 or not getattr(distance, "is_inverted", True):
        return None
    return "dot", normalize


def __getattr__(name):
    from ._fallback import pml_fallback

    return pml_fallback(__name__, "distances", name, __all__)
