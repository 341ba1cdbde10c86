"""Baselines that run in the CWAC harness (METHOD.md section 6): SafeInstr changes the data, AsFT adds a penalty
to the same loss, SafeLoRA acts after training. AsFT and SafeLoRA need the base and the aligned model."""
from __future__ import annotations

import random

import torch

from .data import Seq
from .subspace import target_names


def safeinstr_mix(seqs: list[Seq], refusals: list[Seq], frac: float = 0.1, seed: int = 0) -> list[Seq]:
    """SafeInstr: replace a fraction `frac` of the fine-tuning set by refusal examples (harmful -> refusal)."""
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"frac={frac}, expected [0, 1)")
    if not refusals:
        raise ValueError("SafeInstr needs refusal examples")
    rng = random.Random(seed)
    n_safe = round(frac * len(seqs))
    out = rng.sample(seqs, len(seqs) - n_safe) + [rng.choice(refusals) for _ in range(n_safe)]
    rng.shuffle(out)
    return out


@torch.no_grad()
def alignment_projectors(base, aligned, patterns) -> dict[str, torch.Tensor]:
    """C = V V^T / ||V||_F with V = W_aligned - W_base, per target weight (out x out): the alignment matrix that
    AsFT and SafeLoRA use (computed in float32)."""
    b, a = dict(base.named_modules()), dict(aligned.named_modules())
    out = {}
    for n in target_names(aligned, patterns):
        V = (a[n].weight - b[n].weight).float()
        out[n] = V @ V.T / V.norm().clamp(min=1e-12)
    return out


class AsFTPenalty:
    """AsFT: lam * sum over targets of ||(I - C) dW||_F^2 with dW = W - W_aligned (keeps updates along C)."""

    def __init__(self, aligned, C: dict[str, torch.Tensor], lam: float = 1.0):
        mods = dict(aligned.named_modules())
        self.C, self.lam = C, lam
        self.W0 = {n: mods[n].weight.detach().clone() for n in C}

    def __call__(self, model) -> torch.Tensor:
        mods = dict(model.named_modules())
        total = 0.0
        for n, C in self.C.items():
            dW = (mods[n].weight - self.W0[n]).float()
            total = total + ((dW - C.to(dW.device) @ dW) ** 2).sum()
        return self.lam * total


@torch.no_grad()
def safelora_project_(model, aligned, C: dict[str, torch.Tensor], threshold: float = 0.5) -> dict[str, float]:
    """SafeLoRA-style post-hoc step: for each target with cos(C dW, dW) < threshold, dW <- C dW.
    Returns the cosine per layer (the layers below the threshold were projected)."""
    mods, ref = dict(model.named_modules()), dict(aligned.named_modules())
    cos = {}
    for n, C in C.items():
        W = mods[n].weight
        dW = (W - ref[n].weight).float()
        P = C.to(dW.device) @ dW
        c = float((P * dW).sum() / (P.norm() * dW.norm()).clamp(min=1e-12))
        cos[n] = c
        if c < threshold:
            W.copy_((ref[n].weight.float() + P).to(W.dtype))
    return cos
