"""Exercise checks of notebook 08 (ablations and baselines).

Each check builds its own small inputs (two tiny seeded models of the package's own class, hand-made candidate
lists) and compares the learner's function with the package's: `core.baselines.alignment_projectors` for the
alignment matrix that AsFT and SafeLoRA use, `toy.select.choose` for the rule `select` applies to its candidates.
"""
from __future__ import annotations

import copy

import torch

from minicwac.core.baselines import alignment_projectors
from minicwac.io.config import Config
from minicwac.io.model import GPT
from minicwac.toy.select import choose

DOWN = r"model\.layers\.\d+\.mlp\.down_proj"


def _tiny_pair(seed: int = 0) -> tuple[GPT, GPT]:
    """A tiny 'base' model and an 'aligned' copy whose weights moved a little (seeded)."""
    torch.manual_seed(seed)
    cfg = Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    base = GPT(cfg).eval()
    aligned = copy.deepcopy(base)
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return base, aligned


def check_alignment_matrix(fn) -> None:
    """fn(W_base, W_aligned) -> C (out x out) must equal the package's alignment matrix for every down_proj."""
    base, aligned = _tiny_pair()
    want = alignment_projectors(base, aligned, (DOWN,))
    b, a = dict(base.named_modules()), dict(aligned.named_modules())
    for name, C in want.items():
        Wb, Wa = b[name].weight.detach().clone(), a[name].weight.detach().clone()
        got = fn(Wb, Wa)
        assert torch.is_tensor(got), f"{name}: expected a tensor, got {type(got).__name__}"
        assert tuple(got.shape) == tuple(C.shape), (
            f"{name}: C has shape {tuple(got.shape)}, expected {tuple(C.shape)} (out x out): V V^T, not V^T V")
        assert torch.allclose(got.trace(), C.trace(), rtol=1e-4), (
            f"{name}: trace(C) {float(got.trace()):.5f}, expected ||V||_F {float(C.trace()):.5f}: divide V V^T by "
            "the Frobenius norm ||V||_F, not its square, and take V = W_aligned - W_base")
        torch.testing.assert_close(got.float(), C, rtol=1e-4, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: C differs from the package's ({m}); expected "
                                   "C = V V^T / ||V||_F with V = W_aligned - W_base")
    # a layer alignment did not touch gives C = 0, not NaN
    W = torch.randn(8, 5)
    zero = fn(W, W.clone())
    assert not torch.isnan(zero).any(), "an unchanged layer (V = 0) gave NaN: guard the division (C should be 0)"
    assert torch.count_nonzero(zero) == 0, "an unchanged layer (V = 0) should give C = 0"


def _cands(rows: list[tuple[float, float, float]]) -> list[dict]:
    return [{"settings": {"i": i}, "hs": hs, "fa": fa, "over_refusal": o} for i, (hs, fa, o) in enumerate(rows)]


def check_choose(fn) -> None:
    """fn(cands, fa_min, or_max) must pick what `toy.select.choose` picks (or None) on a few hand-made grids."""
    cases = {
        "the lowest HS among the allowed": ([(40.0, 98.0, 0.0), (10.0, 90.0, 0.0), (20.0, 97.5, 1.0)], 96.5, 5.0),
        "over-refusal above the limit excludes": ([(30.0, 98.0, 0.0), (5.0, 98.0, 9.0)], 96.5, 5.0),
        "a tie goes to the earlier candidate": ([(50.0, 98.0, 0.0), (12.0, 97.0, 0.0), (12.0, 98.0, 0.0)], 96.5, 5.0),
        "a value exactly on a limit is allowed": ([(60.0, 98.0, 0.0), (8.0, 96.5, 5.0)], 96.5, 5.0),
        "nothing allowed gives None": ([(10.0, 90.0, 0.0), (5.0, 98.0, 20.0)], 96.5, 5.0),
    }
    for what, (rows, fa_min, or_max) in cases.items():
        want = choose(_cands(rows), fa_min, or_max)
        got = fn(_cands(rows), fa_min, or_max)
        if want is None:
            assert got is None, f"{what}: expected None (no candidate meets both limits), got {got}"
            continue
        assert isinstance(got, dict), f"{what}: expected the chosen candidate (a dict), got {got!r}"
        assert got["settings"] == want["settings"], (
            f"{what}: chose candidate {got['settings']['i']}, the rule chooses {want['settings']['i']} (allowed: "
            "FA >= fa_min and over-refusal <= or_max; among those the lowest HS, the earliest of ties)")
