"""Exercise checks of notebook 04 (the safety subspace): the update projection W <- W - (W S - W0 S) S^T.

Each check builds its own small inputs (a seeded tiny GPT from the package, random prompts), never the
notebook's state, and compares the learner's function with the package's own.
"""
from __future__ import annotations

import copy

import torch

from minicwac.core import subspace
from minicwac.io.config import Config
from minicwac.io.model import GPT

PAD = 0


def _tiny_model_and_subspace(energy: float = 0.9):
    """A seeded tiny Llama-style GPT (hidden 32, MLP 64, 2 blocks), its safety subspace on 24 random prompts (S in
    float64), and a fine-tuned stand-in: the same model with noise added to every down_proj."""
    torch.manual_seed(0)
    cfg = Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    model = GPT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 97, (int(n),), generator=g).tolist() for n in torch.randint(6, 14, (24,), generator=g)]
    sub = subspace.compute_subspace(model, prompts, PAD, energy=energy, dtype=torch.float64)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for name in sub.S:
            w = tuned.get_submodule(name).weight
            w.add_(0.05 * torch.randn(w.shape, generator=g))
    return model, tuned, sub


def check_project_update(fn) -> None:
    """`fn(W, S, W0S)` -> the projected weight (out, in), for W (out, in), S (in, k) with orthonormal columns and
    W0S = W0 S (out, k); compared with `Subspace.project_` on every down_proj of a tiny model."""
    model, tuned, sub = _tiny_model_and_subspace()
    before = {name: tuned.get_submodule(name).weight.detach().double().clone() for name in sub.S}
    sub.project_(tuned)  # the package, in place
    for name, S in sub.S.items():
        W, W0S = before[name], sub.W0S[name]
        W0 = model.get_submodule(name).weight.detach().double()
        got = fn(W.clone(), S.clone(), W0S.clone())
        assert isinstance(got, torch.Tensor), f"{name}: expected a tensor (the new W), got {type(got).__name__}"
        assert got.shape == W.shape, (f"{name}: the result has shape {tuple(got.shape)}, expected W's "
                                      f"{tuple(W.shape)}: (W S - W0S) is (out, k); bring it back with S^T on the "
                                      "right, (W S - W0S) @ S.T")
        got = got.double()
        want = tuned.get_submodule(name).weight.detach().double()
        if torch.allclose(got, W):
            raise AssertionError(f"{name}: the weight came back unchanged: subtract (W S - W0S) S^T from W")
        if torch.allclose(got, W - (W @ S) @ S.T, atol=1e-6):
            raise AssertionError(f"{name}: you took W's whole response to S away (W S = 0 afterwards); the layer "
                                 "must answer S as the aligned one did, W S = W0S: subtract (W S - W0S) S^T")
        if torch.allclose(got, W - (W @ S - W0S) @ S.T - W0S @ S.T, atol=1e-6) or \
                torch.allclose(got, W - (W @ S + W0S) @ S.T, atol=1e-6):
            raise AssertionError(f"{name}: a sign on W0S: the correction is (W S - W0S) S^T, so that W S becomes W0S")
        moved = float(((got - W0) @ S).norm() / (W - W0).norm())
        assert moved < 1e-6, (f"{name}: (W_new - W0) S should be 0, it is {moved:.2e} of ||W - W0||: is S^T "
                              "applied on the right, and is W0S used as given (W0 S, not S W0)?")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0,
                                   msg=lambda m: f"{name}: differs from Subspace.project_ ({m}): only the part "
                                                 "in S may change; W (I - S S^T) must stay as it was")
