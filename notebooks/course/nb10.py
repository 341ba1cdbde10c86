"""Exercise checks of notebook 10 (the drift map): the three terms of y - y0 = W0 dh + dW h0 + dW dh for one linear.

The check builds its own small inputs (a seeded tiny GPT from the package, a perturbed copy standing in for the
fine-tuned model, random prompts), never the notebook's state, and compares the learner's terms with
`minicwac.core.drift.drift_map`.
"""
from __future__ import annotations

import copy

import torch

from minicwac.core.data import pad_right, token_mask
from minicwac.core.drift import drift_map
from minicwac.core.hooks import capture
from minicwac.io.config import Config
from minicwac.io.model import GPT

PAD, BOS = 0, 1
NAMES = ("model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj")  # a late linear: dh is not zero there


def _tiny_pair():
    """A seeded tiny Llama-style GPT (hidden 32, MLP 64, 2 blocks), a copy with noise on every weight (the
    "fine-tuned" model: both dW and dh are non-zero) and 20 random prompts that start with BOS."""
    torch.manual_seed(0)
    cfg = Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    base = GPT(cfg).eval()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.03 * p.abs().mean() * torch.randn(p.shape, generator=g))
    prompts = [[BOS] + torch.randint(2, 97, (int(n),), generator=g).tolist()
               for n in torch.randint(5, 12, (20,), generator=g)]
    return base, tuned, prompts


def check_drift_terms(fn) -> None:
    """`fn(W0, W, h0, h)` -> (dW_h0, W0_dh, second_order), each (tokens, out), for weights (out, in) and inputs
    (tokens, in); their norms summed over tokens / sum ||W0 h0|| are compared with drift_map's."""
    base, tuned, prompts = _tiny_pair()
    pkg = drift_map(base, tuned, prompts, PAD, skip_ids=[BOS])["linears"]
    ids, mask = pad_right(prompts, PAD)
    keep = token_mask(ids, mask, [BOS])
    with torch.no_grad(), capture(base, list(NAMES), what="input") as a, capture(tuned, list(NAMES), what="input") as b:
        base(ids)
        tuned(ids)
    for name in NAMES:
        W0 = base.get_submodule(name).weight.detach()
        W = tuned.get_submodule(name).weight.detach()
        h0, h = a[name][keep], b[name][keep]  # (tokens, in)
        out = fn(W0.clone(), W.clone(), h0.clone(), h.clone())
        assert isinstance(out, (tuple, list)) and len(out) == 3, \
            "expected three tensors back: (dW_h0, W0_dh, second_order)"
        for term, t in zip(("dW_h0", "W0_dh", "second_order"), out):
            assert tuple(t.shape) == (len(h0), W.shape[0]), (
                f"{name}: {term} has shape {tuple(t.shape)}, expected (tokens, out) = {(len(h0), W.shape[0])}: the "
                "rows of h are tokens, so the layer is applied as h @ W.T")
        dW_h0, W0_dh, second = (t.float() for t in out)
        exact = h @ W.T - h0 @ W0.T
        ref = float((h0 @ W0.T).norm(dim=-1).sum())
        dW, dh = W - W0, h - h0
        if torch.allclose(W0_dh, dh @ W.T, atol=1e-6) and not torch.allclose(W0_dh, dh @ W0.T, atol=1e-6):
            raise AssertionError(f"{name}: W0_dh was computed with the fine-tuned W: the drift arriving from upstream "
                                 "is passed on by the OLD weight, W0 dh (the rest, dW dh, is the second-order term)")
        if torch.allclose(dW_h0, h @ dW.T, atol=1e-6) and not torch.allclose(dW_h0, h0 @ dW.T, atol=1e-6):
            raise AssertionError(f"{name}: dW_h0 used the fine-tuned input h: the layer's own change acts on the "
                                 "ALIGNED model's input h0")
        torch.testing.assert_close(dW_h0 + W0_dh + second, exact, atol=1e-6, rtol=1e-5,
                                   msg=lambda m: f"{name}: the three terms do not add up to W h - W0 h0 ({m}): with "
                                                 "W = W0 + dW and h = h0 + dh the identity is exact")
        for term, t in zip(("dW_h0", "W0_dh", "second_order"), (dW_h0, W0_dh, second)):
            mine = float(t.norm(dim=-1).sum()) / ref
            assert abs(mine - pkg[name][term]) <= 1e-4 * max(1.0, abs(mine)), (
                f"{name}: {term}: sum of per-token norms / sum ||W0 h0|| is {mine:.6f}, drift_map says "
                f"{pkg[name][term]:.6f}")
