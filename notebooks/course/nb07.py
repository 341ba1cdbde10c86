"""Checks for the exercises of notebook 07 (CWAC: both constraints in one training step).

Each check builds its own small inputs (seeded random tensors) and compares your function with the package's own
code in `minicwac.core`; an AssertionError says what differs and what the likely mistake is.
"""
from __future__ import annotations

import torch

from minicwac.core.subspace import Subspace


def _inputs(out_dim: int = 12, in_dim: int = 20, k: int = 6, seed: int = 0):
    """An aligned weight W0, a fine-tuned W = W0 + dW, an orthonormal S (in x k) and W0S = W0 S (float64)."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64)
    W = W0 + 0.1 * torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64)
    S, _ = torch.linalg.qr(torch.randn(in_dim, k, generator=g, dtype=torch.float64))  # orthonormal columns
    return W0, W, S, W0 @ S


def _package_projection(W: torch.Tensor, S: torch.Tensor, W0S: torch.Tensor) -> torch.Tensor:
    """What `Subspace.project_` does to a one-layer model holding W."""
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=W.dtype)
    with torch.no_grad():
        layer.weight.copy_(W)
    model = torch.nn.Module()
    model.proj = layer  # module name "proj"
    Subspace({"proj": S}, {"proj": W0S}).project_(model)
    return layer.weight.detach().clone()


def check_weight_projection(fn) -> None:
    """fn(W, S, W0S) -> the projected weight, W - (W S - W0S) S^T; W is not to be changed in place."""
    for seed, shape in enumerate([(12, 20, 6), (5, 8, 1), (7, 16, 16)]):
        W0, W, S, W0S = _inputs(*shape, seed=seed)
        W_before = W.clone()
        got = fn(W, S, W0S)
        assert isinstance(got, torch.Tensor) and got.shape == W.shape, \
            f"expected a tensor of W's shape {tuple(W.shape)}, got {getattr(got, 'shape', type(got))}"
        assert torch.equal(W, W_before), "W was changed in place: return a new tensor (e.g. W - ...), do not use -="
        torch.testing.assert_close(
            got @ S, W0S, atol=1e-10, rtol=1e-10,
            msg=lambda m: f"after the projection W S should equal W0S ({m}). Probably: W S - W0S multiplied by S "
                          "instead of S^T, S S^T on the wrong side of W (it acts on the input side: W @ S @ S.T), or "
                          "W0S left out (that projects onto W S = 0, not W S = W0 S)")
        v = torch.randn(W.shape[1], 1, dtype=W.dtype, generator=torch.Generator().manual_seed(100 + seed))
        v = v - S @ (S.T @ v)  # an input orthogonal to S
        torch.testing.assert_close(
            got @ v, W @ v, atol=1e-10, rtol=1e-10,
            msg=lambda m: f"an input orthogonal to S should see the fine-tuned W unchanged ({m}). Probably: W reset "
                          "to W0 or a projector other than S S^T")
        torch.testing.assert_close(got, _package_projection(W, S, W0S), atol=1e-10, rtol=1e-10,
                                   msg=lambda m: f"differs from Subspace.project_ ({m})")
