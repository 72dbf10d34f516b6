"""The losses' L2 normalization (closed-form backward) against autograd through F.normalize."""

import pytest
import torch
import torch.nn.functional as F

from fastdml._common import NORMALIZE_EPS, _normalize
from tests.conftest import TOL


def _rows(dtype):
    x = torch.randn(40, 7, dtype=torch.float64)
    x[3] = 0.0  # zero row: divided by eps
    x[4] = 1e-14  # below eps
    x[5] *= NORMALIZE_EPS / x[5].norm()  # at eps
    x[6] *= 1e6
    return x.to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_row_normalize_equals_f_normalize_values_and_gradients(dtype):
    x = _rows(dtype)
    got, want = _normalize(x), F.normalize(x, p=2, dim=1)
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    (a,) = torch.autograd.grad(got, x, g)
    (b,) = torch.autograd.grad(want, x, g)
    # the rows below eps have gradients ~1/eps: compare relative to each row's scale
    scale = b.abs().amax(1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(a / scale, b / scale, **TOL[dtype])


def test_row_normalize_passes_gradcheck():
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_normalize, (x,))


def test_row_normalize_of_half_rows_is_float32():
    x = torch.randn(6, 4, dtype=torch.float16, requires_grad=True)
    y = _normalize(x)
    assert y.dtype == torch.float32
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.dtype == torch.float16 and torch.isfinite(g).all()


def test_row_normalize_compiles_with_fullgraph():
    x = torch.randn(8, 3, requires_grad=True)
    f = torch.compile(lambda t: _normalize(t).square().sum(), fullgraph=True, backend="eager")
    (a,) = torch.autograd.grad(f(x), x)
    (b,) = torch.autograd.grad(F.normalize(x, dim=1).square().sum(), x)
    torch.testing.assert_close(a, b, **TOL[torch.float32])
