"""Baselines that run in the CWAC harness (docs/method.md#6-baselines): SafeInstr changes the data, AsFT adds a
penalty to the same loss, SafeLoRA acts after training. AsFT and SafeLoRA need the base and the aligned model.

Each has the form its authors wrote and the form minicwac's main table runs (docs/results.md says which is which):
SafeInstr *adds* refusal examples (mode "add") or *replaces* a share of the task examples ("replace"); SafeLoRA
projects the layers below a cosine threshold, or a fixed number of the lowest-cosine layers (`n_project`, the
authors' default); AsFT takes whatever targets it is given (its authors: LoRA on q_proj and v_proj)."""
from __future__ import annotations

import random

import torch

from .data import Seq
from .subspace import target_names


def safeinstr_mix(seqs: list[Seq], refusals: list[Seq], frac: float = 0.1, seed: int = 0,
                  mode: str = "replace") -> list[Seq]:
    """SafeInstr: round(frac * len(seqs)) refusal examples (harmful -> refusal) that replace as many task
    examples (mode "replace": the set keeps its size) or are added to them (mode "add": its authors' form)."""
    if mode not in ("replace", "add"):
        raise ValueError(f"mode={mode!r}, expected 'replace' or 'add'")
    # replacing every task example would leave no task to learn; adding allows up to ten times the set's size
    if not (0.0 <= frac < 1.0 if mode == "replace" else 0.0 <= frac <= 10.0):
        raise ValueError(f"frac={frac}, expected [0, 1) to replace, [0, 10] to add")
    if not refusals:
        raise ValueError("SafeInstr needs refusal examples")
    rng = random.Random(seed)
    n_safe = round(frac * len(seqs))  # counted on the task set, in both modes
    # replace: a random subset of the task examples, drawn without repetition
    kept = rng.sample(seqs, len(seqs) - n_safe) if mode == "replace" else list(seqs)
    # refusals drawn with repetition: a few refusal examples can fill any share
    out = kept + [rng.choice(refusals) for _ in range(n_safe)]
    rng.shuffle(out)  # the refusals spread over the batches, not all at the end
    return out


@torch.no_grad()
def alignment_projectors(base, aligned, patterns) -> dict[str, torch.Tensor]:
    """C = V V^T / ||V||_F with V = W_aligned - W_base, per target weight (out x out): the alignment matrix that
    AsFT and SafeLoRA use (computed in float32)."""
    # name -> module; the two models share their module names
    b, a = dict(base.named_modules()), dict(aligned.named_modules())
    out = {}
    for n in target_names(aligned, patterns):
        V = (a[n].weight - b[n].weight).float()  # (out, in): what alignment changed in this layer
        # (out, out): weights the output directions alignment moved by how far it moved them (V V^T scaled by
        # 1 / ||V||_F, not an exact projector); a layer alignment did not change gives C = 0, not NaN (the clamp)
        out[n] = V @ V.T / V.norm().clamp(min=1e-12)
    return out


class AsFTPenalty:
    """AsFT: lam * sum over targets of ||(I - C) dW||_F^2 with dW = W - W_aligned (keeps updates along C)."""

    def __init__(self, aligned, C: dict[str, torch.Tensor], lam: float = 1.0):
        mods = dict(aligned.named_modules())
        self.C, self.lam = C, lam
        # (out, in) each: a frozen copy, dW is measured from it
        self.W0 = {n: mods[n].weight.detach().clone() for n in C}

    def __call__(self, model) -> torch.Tensor:
        mods = dict(model.named_modules())
        total = 0.0
        for n, C in self.C.items():
            # (out, in), float32; the graph runs through W, so the penalty has a gradient
            dW = (mods[n].weight - self.W0[n]).float()
            # ||(I - C) dW||_F^2 without forming I: the part of dW off the alignment directions, squared
            total = total + ((dW - C.to(dW.device) @ dW) ** 2).sum()
        return self.lam * total


@torch.no_grad()
def safelora_project_(model, aligned, C: dict[str, torch.Tensor], threshold: float = 0.5,
                      n_project: int | None = None) -> dict[str, float]:
    """SafeLoRA's post-hoc step: dW <- C dW for the targets whose cos(C dW, dW) is below `threshold`, or, with
    n_project, for the n_project targets of lowest cosine (its authors' default mode). Returns the cosine per
    target, measured before any projection."""
    mods, ref = dict(model.named_modules()), dict(aligned.named_modules())
    cos, proj = {}, {}  # per target: cos(C dW, dW) and C dW
    for n, Cn in C.items():
        dW = (mods[n].weight - ref[n].weight).float()  # (out, in): what fine-tuning changed in this layer
        proj[n] = Cn.to(dW.device) @ dW  # (out, out) @ (out, in): dW kept along the alignment directions
        # near 1: the update already lies along the alignment directions; lower: it left them
        cos[n] = float((proj[n] * dW).sum() / (proj[n].norm() * dW.norm()).clamp(min=1e-12))
    if n_project is None:  # the threshold form (`safelora`)
        chosen = [n for n in C if cos[n] < threshold]
    else:  # the fixed-number form (`safelora-qv`)
        if not 0 <= n_project <= len(C):
            raise ValueError(f"n_project={n_project}, expected 0..{len(C)} (the number of targets)")
        chosen = sorted(C, key=lambda n: cos[n])[:n_project]  # sorted is stable: ties keep the targets' order
    for n in chosen:
        W = mods[n].weight
        # W <- W_aligned + C dW, back in the weight's dtype (C dW was computed in float32)
        W.copy_((ref[n].weight.float() + proj[n]).to(W.dtype))
    return cos
