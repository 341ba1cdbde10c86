"""The CWAC step, written out by hand, and the one loop that every training run of minicwac goes through.

    loss = CE(task batch, assistant tokens only) + lam * L_safety(harmful prompt batch)     # activation side
    loss.backward()
    g <- g - (g S) S^T           for every target layer (the part of g the projection below discards anyway)
    clip ||g||; optimizer.step(); optimizer.zero_grad()
    W <- W - (W S - W0S) S^T     for every target layer (its bias, if any, frozen)          # weight side

Switches: no subspace and no features = SFT (and pretraining, and alignment); subspace only = weight-only;
features only = activation-only; both = CWAC. AsFT adds its penalty to the same loss (`baselines.py`).
The step takes any model with Hugging Face module names: minicwac's GPT or a transformers model.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import Seq, batches, collate, lm_loss, lr_at, make_optimizer, n_targets
from .features import SafetyFeatures
from .hooks import model_device
from .settings import SEED_SAFETY
from .subspace import Subspace


def autocast(model, dtype: torch.dtype | None):
    """bf16 compute over float32 weights ("bf16-mixed"): matmuls in `dtype`, the weights the projection acts on
    stay float32, so W S = W0 S holds to float32 precision. None: compute in the weights' own dtype."""
    if dtype is None:
        return nullcontext()
    # autocast casts inside the ops only: the parameters, their gradients and AdamW's state keep the weights' dtype
    return torch.autocast(model_device(model).type, dtype=dtype)


def warn_low_precision(model, sub: Subspace | None) -> None:
    """Warn when a constrained weight is not float32: W0S is exact in float32, and a bf16 W rounds the projected
    values off again at every step, so (W - W0) S = 0 holds only to bf16 precision."""
    if sub is None:
        return
    low = {str(m.weight.dtype) for n, m in model.named_modules() if n in sub.S and m.weight.dtype != torch.float32}
    if low:
        warnings.warn(f"the constrained weights are {', '.join(sorted(low))}: (W - W0) S = 0 then holds only to that "
                      "precision; keep the weights float32 and compute in bf16 with autocast_dtype=torch.bfloat16 "
                      "(bf16-mixed) for an exact constraint", stacklevel=3)


def cwac_step(model, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor], *,
              subspace: Subspace | None = None, features: SafetyFeatures | None = None, lam: float = 0.0,
              safety_batch: torch.Tensor | None = None, penalty: Callable | None = None, grad_clip: float = 1.0,
              project_update: bool = True, project_grad: bool = False, autocast_dtype: torch.dtype | None = None,
              n_task: int | None = None, n_safety: int | None = None) -> dict[str, float]:
    """One optimizer step of the method (the docstring of this module is its math). Returns the loss terms and the
    gradient norm before clipping (NaN/Inf: the step was not applied).

    batch: (input_ids, labels) with labels -100 where no loss is taken. safety_batch: indices into the
    features' fixed harmful prompts (all of them if None). project_update (default): the exact weight constraint;
    the gradient is projected first too, so the clip norm measures the update that is actually applied and a
    constrained run is not slowed down by a part of g that is thrown away. project_grad without project_update:
    the gradient-only variant (the paper's wording; not exact under AdamW). n_task, n_safety: when `batch` and
    `safety_batch` are one rank's part of a global batch, the global counts of loss tokens; each loss is then
    this rank's sum over the global count, and the ranks' gradients add up to those of the global means."""
    input_ids, labels = batch  # (B, T) each
    with autocast(model, autocast_dtype):
        # the task: next-token cross-entropy on the tokens that have a label (for chat data, the assistant's)
        task = lm_loss(model, input_ids, labels, n_task)
        # the activation side: the current model's readout z on harmful prompts, pulled back to the aligned z0.
        # It needs only a forward up to the SAE layer, on a batch of its own (the fixed calibration prompts).
        safety = features.loss(model, safety_batch, n_safety) if features is not None and lam > 0 else None
    loss = task if safety is None else task + lam * safety
    if penalty is not None:
        loss = loss + penalty(model)  # AsFT, in float32 outside autocast
    loss.backward()
    if subspace is not None and (project_update or project_grad):
        # The part of g on S would be undone by project_ below; removing it now keeps it out of the clip norm
        # and out of AdamW's moment estimates. On its own (project_grad) this is the paper's gradient projection.
        subspace.project_grad_(model)  # g <- g - (g S) S^T
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # the total norm, before clipping
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: every rank's global norm
    # AdamW divides each coordinate by its own sqrt(v) and decays W towards 0: even a projected g gives an
    # update with a component on S, which is why the weights themselves are projected after the step
    if math.isfinite(norm):  # a NaN/Inf gradient is never applied: the loop then ends the run (`global_terms`)
        opt.step()
    opt.zero_grad(set_to_none=True)
    if subspace is not None and project_update:
        subspace.project_(model)  # exact: (W - W0) S = 0 after every step, whatever AdamW did
    return {"loss": loss.item(), "task": task.item(), "safety": 0.0 if safety is None else safety.item(),
            "grad_norm": norm}


@dataclass
class Schedule:
    """How one run trains: AdamW, a linear warmup then cosine decay, gradient clipping, the batches' order."""

    steps: int
    batch_size: int = 16  # sequences per step (in a data-parallel run: the global batch)
    lr: float = 1e-4  # the peak learning rate
    weight_decay: float = 0.1
    warmup: int | None = None  # None: 5% of the steps
    grad_clip: float = 1.0
    seed: int = 0  # the batches' order; the safety picks use seed + SEED_SAFETY

    def check(self) -> "Schedule":
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must be >= 1")
        return self


@dataclass
class Constraints:
    """What a run adds to plain training (nothing: SFT); the rows of `settings.METHODS` say which."""

    subspace: Subspace | None  # the weight constraint: W S = W0 S after every step (None: none)
    features: SafetyFeatures | None  # the activation constraint: L_safety on these latents (None: none) ...
    lam: float  # ... with this weight in the loss (`KitSettings.lam`)
    safety_batch: int  # harmful prompts per step for L_safety (`KitSettings.safety_batch`)
    project_update: bool = True  # the exact weight constraint (the update projected); False with project_grad:
    project_grad: bool = False  # the gradient-only variant, as the paper words it (not exact under AdamW)
    penalty: Callable | None = None  # penalty(model) -> a scalar added to the loss (AsFT)

    def check(self, world_size: int, batch_size: int) -> "Constraints":
        if self.lam < 0:
            raise ValueError(f"lam={self.lam}, expected >= 0")
        # every rank trains on an equal share of both global batches (the safety batch only where L_safety runs)
        safety_split = self.features is not None and self.lam > 0 and self.safety_batch % world_size
        if world_size > 1 and (batch_size % world_size or safety_split or self.penalty is not None):
            raise ValueError(f"on {world_size} ranks --batch-size ({batch_size}) and the safety batch "
                             f"({self.safety_batch}) must be multiples of {world_size}, and no extra penalty term is "
                             "supported")
        return self


def finetune_cwac(model, seqs: list[Seq], schedule: Schedule, constraints: Constraints | None = None, *,
                  pad_id: int = 0, autocast_dtype: torch.dtype | None = None,
                  curve: tuple[int, Callable] | None = None, resume: dict | None = None,
                  on_step: Callable | None = None, proc=None, desc: str = "cwac", progress: bool = True) -> dict:
    """Train `model` in place for `schedule.steps` calls of `cwac_step`. Returns a history: step, loss, task,
    safety, lr (+ "curve": eval_fn(model) at step 0, every `every` steps and at the last, with curve=(every, eval_fn)).

    constraints: the weight and activation constraints (None: plain training). resume: {"step": k, "optimizer":
    state_dict, "history": ...} from `on_step` continues a run at step k with the same batches as an uninterrupted
    run (the data order and the safety picks are replayed); "optimizer" may also be a function that loads the
    weights and the optimizer state itself (a sharded checkpoint). on_step(step, model, opt, history) is called
    after every step (checkpoints).
    proc: this process's place in a data-parallel run (`.rank`, `.world_size`, `.device`: `io.dist.Process`):
    every rank draws the same global batch of sequences (and of safety prompts) and trains on its 1/world_size part
    of it, so one command gives the same run on 1 or N ranks; the history holds the global losses."""
    sch, c = schedule.check(), constraints or Constraints(None, None, 0.0, 1)
    if not seqs:
        raise ValueError("no training sequences")
    rank, world_size = (0, 1) if proc is None else (proc.rank, proc.world_size)
    c.check(world_size, sch.batch_size)
    # where the batches go (not where offloaded weights are)
    device = model_device(model) if proc is None else proc.device
    # S and W0S beside the weights: the projection after every step then moves no data
    sub = c.subspace.to(model_device(model)) if c.subspace is not None else None
    warn_low_precision(model, sub)
    feats = c.features if c.features is not None and c.lam > 0 else None  # lam = 0: no safety forward at all
    warmup = max(1, sch.steps // 20) if sch.warmup is None else sch.warmup  # default: 5% of the steps
    # a target's bias would shift its output on the protected inputs: not trained (restored however we leave)
    frozen = [b for b in sub.biases(model) if b.requires_grad] if sub is not None and c.project_update else []
    for b in frozen:
        b.requires_grad_(False)
    try:
        opt = make_optimizer(model, sch.lr, sch.weight_decay)
        data = batches(seqs, sch.batch_size, sch.seed)  # endless shuffled batches of training sequences
        # harmful prompt batches for L_safety: a generator of their own, so that the task batches are the same
        # with and without the activation constraint
        g = torch.Generator().manual_seed(sch.seed + SEED_SAFETY)

        def draw():  # indices into the fixed harmful prompts, on the CPU generator: the same picks on any device
            return torch.randint(len(feats.ids), (c.safety_batch,), generator=g) if feats is not None else None

        start, hist = 0, {"step": [], "loss": [], "task": [], "safety": [], "lr": [], "curve": []}
        if resume is not None:
            start, hist = resume_from(resume, opt, data, draw)
        elif curve is not None:
            hist["curve"].append({"step": 0, **curve[1](model)})  # the curve starts before the first step
        model.train()
        for step in (bar := tqdm(range(start, sch.steps), desc=desc, disable=not progress, mininterval=1.0,
                                 initial=start, total=sch.steps)):
            for group in opt.param_groups:  # one schedule for both groups (with and without weight decay)
                group["lr"] = lr_at(step, sch.steps, sch.lr, warmup)
            batch, pick = next(data), draw()  # B sequences (ids, mask); safety_batch prompt indices
            pick = pick.to(device) if pick is not None else None
            counts = {}
            if world_size > 1:  # this rank's part of the global batch; the losses normalised by the global counts
                batch, pick, counts = rank_part(batch, pick, feats, rank, world_size)
            out = cwac_step(model, opt, collate(batch, pad_id, device), subspace=sub, features=feats, lam=c.lam,
                            safety_batch=pick, penalty=c.penalty, grad_clip=sch.grad_clip,
                            project_update=c.project_update, project_grad=c.project_grad,
                            autocast_dtype=autocast_dtype, **counts)
            out = global_terms(out, step, sch, world_size, device)  # a NaN/Inf step ends the run here
            hist["step"].append(step)
            for k, v in out.items():  # loss, task, safety
                hist[k].append(v)
            hist["lr"].append(opt.param_groups[0]["lr"])
            bar.set_postfix(task=f"{out['task']:.3f}", safety=f"{out['safety']:.3f}")
            # measured in eval mode, then back to training; the curve always ends at the last step
            if curve is not None and ((step + 1) % curve[0] == 0 or step + 1 == sch.steps):
                model.eval()
                hist["curve"].append({"step": step + 1, **curve[1](model)})
                model.train()
            if on_step is not None:  # step + 1 steps are done: where a run resumed from this checkpoint starts
                on_step(step + 1, model, opt, hist)
    finally:  # also on an error or an interrupt: eval mode, and the frozen biases trainable again
        model.eval()
        for b in frozen:
            b.requires_grad_(True)
    return hist


class DivergedError(ValueError):
    """The training loss or the gradient norm became NaN or Inf: the run has diverged and is stopped."""


def global_terms(out: dict, step: int, sch: Schedule, world_size: int, device) -> dict:
    """The step's loss terms over the global batch (on N ranks: the sum of the ranks' parts). A NaN/Inf loss or
    gradient norm (global already) stops a diverged run at once, on every rank alike, before `on_step` (no
    checkpoint of a NaN model) and before any output is written: every later step would be NaN too."""
    norm = out.pop("grad_norm")
    if world_size > 1:
        total = torch.tensor([out["loss"], out["task"], out["safety"]], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        out = dict(zip(("loss", "task", "safety"), total.tolist()))
    if not (math.isfinite(out["loss"]) and math.isfinite(norm)):
        raise DivergedError(f"training diverged at step {step + 1} of {sch.steps}: loss {out['loss']:.4g}, gradient "
                            f"norm {norm:.4g}{'' if math.isfinite(norm) else ' (that update was not applied)'}; try "
                            f"a lower learning rate than lr={sch.lr:g}")
    return out


def resume_from(resume: dict, opt, data, draw) -> tuple[int, dict]:
    """Load a checkpoint's optimizer state and replay the random draws of its steps; returns (step, history)."""
    if callable(resume["optimizer"]):  # a sharded checkpoint loads itself (`dist.load_sharded`)
        resume["optimizer"](opt)
    else:
        opt.load_state_dict(resume["optimizer"])
    for _ in range(resume["step"]):  # the data order and the safety picks of the steps already taken
        next(data), draw()
    return resume["step"], resume["history"]  # the history goes on from the checkpoint's


def rank_part(batch: list[Seq], pick: torch.Tensor | None, feats: SafetyFeatures | None, rank: int, world_size: int):
    """This rank's contiguous share of the global batch and of the safety picks, and the global counts of loss
    tokens (taken before slicing) that each rank divides its sums by."""
    counts = {"n_task": n_targets(batch), "n_safety": int(feats.keep[pick].sum()) if feats is not None else None}
    batch = batch[rank * len(batch) // world_size:(rank + 1) * len(batch) // world_size]
    return batch, pick.chunk(world_size)[rank] if feats is not None else None, counts


def train(model, seqs: list[Seq], *, steps: int, batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.1,
          warmup: int | None = None, grad_clip: float = 1.0, pad_id: int = 0, seed: int = 0, desc: str = "train",
          progress: bool = True) -> dict:
    """Plain training (pretraining, alignment, SFT): the CWAC loop with no constraint. Returns step, loss, lr."""
    h = finetune_cwac(model, seqs, Schedule(steps, batch_size, lr, weight_decay, warmup, grad_clip, seed),
                      pad_id=pad_id, desc=desc, progress=progress)
    return {k: h[k] for k in ("step", "loss", "lr")}
