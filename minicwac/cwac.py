"""The CWAC fine-tuning loop, written out by hand, and the baselines that run in the same harness.

    loss = CE(task batch, assistant tokens only) + lam * L_safety(harmful prompt batch)     # activation side
    loss.backward(); optimizer.step(); optimizer.zero_grad()
    W <- W - (W S - W0S) S^T   for every target layer (its bias, if any, frozen)           # weight side

Switches: no subspace and no features = SFT; subspace only = weight-only; features only = activation-only;
both = CWAC. AsFT adds its penalty to the same loss; SafeInstr changes the data; SafeLoRA acts after training.
"""
from __future__ import annotations

import random
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .features import SafetyFeatures
from .subspace import Subspace, target_names
from .train import Seq, batches, collate, lm_loss, lr_at, make_optimizer

METHODS = ("sft", "weight", "activation", "cwac", "safeinstr", "asft", "safelora")


def finetune_cwac(model, seqs: list[Seq], *, steps: int, batch_size: int = 16, lr: float = 1e-4,
                  weight_decay: float = 0.1, warmup: int | None = None, grad_clip: float = 1.0, pad_id: int = 0,
                  subspace: Subspace | None = None, features: SafetyFeatures | None = None, lam: float = 0.5,
                  safety_batch: int = 16, project_grad: bool = False, project_update: bool = True, penalty: Callable | None = None,
                  seed: int = 0, eval_every: int | None = None, eval_fn: Callable | None = None,
                  desc: str = "cwac", progress: bool = True) -> dict:
    """Fine-tune `model` in place. Returns a history: step, loss, task, safety, lr (+ "curve" from eval_fn).

    subspace: the weight constraint (projection of the update after every step; project_grad also projects the
    gradient before it; project_update=False with project_grad=True is the gradient-only variant, not exact under
    AdamW). features + lam: the activation constraint on `safety_batch` harmful prompts per step.
    penalty(model) -> scalar: any extra loss term (AsFT). eval_fn(model) -> dict, every `eval_every` steps and
    at step 0, gives the drift curve."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1")
    if lam < 0:
        raise ValueError(f"lam={lam}, expected >= 0")
    device = model.device
    subspace = subspace.to(device) if subspace is not None else None
    warmup = max(1, steps // 20) if warmup is None else warmup
    frozen = [b for b in subspace.biases(model) if b.requires_grad] if subspace is not None and project_update else []
    for b in frozen:  # a target's bias would shift its output on the protected inputs: not trained
        b.requires_grad_(False)
    opt = make_optimizer(model, lr, weight_decay)
    data = batches(seqs, batch_size, seed)
    g = torch.Generator().manual_seed(seed + 7)  # harmful prompt batches for L_safety
    hist = {"step": [], "loss": [], "task": [], "safety": [], "lr": [], "curve": []}
    if eval_fn is not None and eval_every:
        hist["curve"].append({"step": 0, **eval_fn(model)})
    model.train()
    for step in (bar := tqdm(range(steps), desc=desc, disable=not progress, mininterval=1.0)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        input_ids, labels = collate(next(data), pad_id, device)
        task = lm_loss(model, input_ids, labels)
        loss = task
        safety = torch.zeros(())
        if features is not None and lam > 0:
            pick = torch.randint(len(features.ids), (safety_batch,), generator=g).to(device)
            safety = features.loss(model, pick)
            loss = loss + lam * safety
        if penalty is not None:
            loss = loss + penalty(model)
        loss.backward()
        if subspace is not None and project_grad:
            subspace.project_grad_(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if subspace is not None and project_update:
            subspace.project_(model)  # exact: (W - W0) S = 0 after every step, whatever AdamW did
        hist["step"].append(step)
        hist["loss"].append(loss.item())
        hist["task"].append(task.item())
        hist["safety"].append(safety.item())
        hist["lr"].append(opt.param_groups[0]["lr"])
        bar.set_postfix(task=f"{hist['task'][-1]:.3f}", safety=f"{hist['safety'][-1]:.3f}")
        if eval_fn is not None and eval_every and (step + 1) % eval_every == 0:
            model.eval()
            hist["curve"].append({"step": step + 1, **eval_fn(model)})
            model.train()
    model.eval()
    for b in frozen:
        b.requires_grad_(True)
    return hist


# ---------------------------------------------------------------- baselines


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
