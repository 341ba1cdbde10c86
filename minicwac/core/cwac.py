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

from collections.abc import Callable
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from .data import Seq, batches, collate, lm_loss, lr_at, make_optimizer, n_targets
from .features import SafetyFeatures
from .hooks import model_device
from .subspace import Subspace


def autocast(model, dtype: torch.dtype | None):
    """bf16 compute over float32 weights ("bf16-mixed"): matmuls in `dtype`, the weights the projection acts on
    stay float32, so W S = W0 S holds to float32 precision. None: compute in the weights' own dtype."""
    if dtype is None:
        return nullcontext()
    # autocast casts inside the ops only: the parameters, their gradients and AdamW's state keep the weights' dtype
    return torch.autocast(model_device(model).type, dtype=dtype)


def cwac_step(model, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor], *,
              subspace: Subspace | None = None, features: SafetyFeatures | None = None, lam: float = 0.0,
              safety_batch: torch.Tensor | None = None, penalty: Callable | None = None, grad_clip: float = 1.0,
              project_update: bool = True, project_grad: bool = False, autocast_dtype: torch.dtype | None = None,
              n_task: int | None = None, n_safety: int | None = None) -> dict[str, float]:
    """One optimizer step of the method (the docstring of this module is its math). Returns the loss terms.

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
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    # AdamW divides each coordinate by its own sqrt(v) and decays W towards 0: even a projected g gives an
    # update with a component on S, which is why the weights themselves are projected after the step
    opt.step()
    opt.zero_grad(set_to_none=True)
    if subspace is not None and project_update:
        subspace.project_(model)  # exact: (W - W0) S = 0 after every step, whatever AdamW did
    return {"loss": loss.item(), "task": task.item(), "safety": 0.0 if safety is None else safety.item()}


def finetune_cwac(model, seqs: list[Seq], *, steps: int, batch_size: int = 16, lr: float = 1e-4,
                  weight_decay: float = 0.1, warmup: int | None = None, grad_clip: float = 1.0, pad_id: int = 0,
                  subspace: Subspace | None = None, features: SafetyFeatures | None = None, lam: float = 0.5,
                  safety_batch: int = 16, project_grad: bool = False, project_update: bool = True,
                  penalty: Callable | None = None, autocast_dtype: torch.dtype | None = None, seed: int = 0,
                  eval_every: int | None = None, eval_fn: Callable | None = None, resume: dict | None = None,
                  on_step: Callable | None = None, desc: str = "cwac", progress: bool = True, rank: int = 0,
                  world: int = 1, device: torch.device | None = None) -> dict:
    """Train `model` in place for `steps` calls of `cwac_step`. Returns a history: step, loss, task, safety, lr
    (+ "curve" from eval_fn every `eval_every` steps and at step 0: the drift curve).

    subspace: the weight constraint. features + lam: the activation constraint on `safety_batch` harmful prompts
    per step. penalty(model) -> scalar: any extra loss term (AsFT). AdamW, warmup then cosine decay.
    resume: {"step": k, "optimizer": state_dict, "history": ...} from `on_step` continues a run at step k with
    the same batches as an uninterrupted run (the data order and the safety picks are replayed); "optimizer" may
    also be a function that loads the weights and the optimizer state itself (a sharded checkpoint).
    on_step(step, model, opt, history) is called after every step (checkpoints).
    rank, world: this process's place in a data-parallel run (`minicwac.io.dist`): every rank draws the same global
    batch of `batch_size` sequences (and `safety_batch` prompts) and trains on its 1/world part of it, so one
    command gives the same run on 1 or N ranks; the history holds the global losses."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1")
    if not seqs:
        raise ValueError("no training sequences")
    if lam < 0:
        raise ValueError(f"lam={lam}, expected >= 0")
    # every rank trains on an equal share of both global batches
    if world > 1 and (batch_size % world or safety_batch % world or penalty is not None):
        raise ValueError(f"on {world} ranks --batch-size ({batch_size}) and the safety batch ({safety_batch}) must be "
                         f"multiples of {world}, and no extra penalty term is supported")
    device = model_device(model) if device is None else device  # where the batches go (not where offloaded weights are)
    # S and W0S beside the weights: the projection after every step then moves no data
    subspace = subspace.to(model_device(model)) if subspace is not None else None
    warmup = max(1, steps // 20) if warmup is None else warmup  # default: 5% of the steps
    # a target's bias would shift its output on the protected inputs: not trained (restored however we leave)
    frozen = [b for b in subspace.biases(model) if b.requires_grad] if subspace is not None and project_update else []
    for b in frozen:
        b.requires_grad_(False)
    try:
        opt = make_optimizer(model, lr, weight_decay)
        data = batches(seqs, batch_size, seed)  # endless shuffled batches of training sequences
        # harmful prompt batches for L_safety: a generator of their own, so that the task batches are the same
        # with and without the activation constraint
        g = torch.Generator().manual_seed(seed + 7)
        use_safety = features is not None and lam > 0  # lam = 0: no safety forward at all, plain SFT cost
        start = 0
        hist = {"step": [], "loss": [], "task": [], "safety": [], "lr": [], "curve": []}
        if resume is not None:
            start, hist = resume["step"], resume["history"]  # the history goes on from the checkpoint's
            if callable(resume["optimizer"]):  # a sharded checkpoint loads itself (`dist.load_sharded`)
                resume["optimizer"](opt)
            else:
                opt.load_state_dict(resume["optimizer"])
            for _ in range(start):  # replay the random draws of the steps already taken
                next(data)
                if use_safety:
                    torch.randint(len(features.ids), (safety_batch,), generator=g)
        elif eval_fn is not None and eval_every:
            hist["curve"].append({"step": 0, **eval_fn(model)})  # the curve starts before the first step
        model.train()
        for step in (bar := tqdm(range(start, steps), desc=desc, disable=not progress, mininterval=1.0,
                                 initial=start, total=steps)):
            for group in opt.param_groups:  # one schedule for both groups (with and without weight decay)
                group["lr"] = lr_at(step, steps, lr, warmup)
            batch = next(data)  # B sequences (ids, mask)
            # indices into the fixed harmful prompts; drawn on the CPU generator, so the same picks on any device
            pick = torch.randint(len(features.ids), (safety_batch,), generator=g).to(device) if use_safety else None
            counts = {}
            if world > 1:  # this rank's part of the global batch; the losses normalised by the global counts
                counts = {"n_task": n_targets(batch),
                          "n_safety": int(features.keep[pick].sum()) if use_safety else None}
                # (the counts above are taken on the global batch, before this rank keeps its contiguous slice)
                batch = batch[rank * len(batch) // world:(rank + 1) * len(batch) // world]
                pick = pick.chunk(world)[rank] if use_safety else None
            out = cwac_step(model, opt, collate(batch, pad_id, device), subspace=subspace, features=features,
                            lam=lam, safety_batch=pick, penalty=penalty, grad_clip=grad_clip,
                            project_update=project_update, project_grad=project_grad, autocast_dtype=autocast_dtype,
                            **counts)
            if world > 1:  # the global losses: the sum of the ranks' parts
                total = torch.tensor([out["loss"], out["task"], out["safety"]], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(total)
                out = dict(zip(("loss", "task", "safety"), total.tolist()))
            hist["step"].append(step)
            for k, v in out.items():  # loss, task, safety
                hist[k].append(v)
            hist["lr"].append(opt.param_groups[0]["lr"])
            bar.set_postfix(task=f"{out['task']:.3f}", safety=f"{out['safety']:.3f}")
            if eval_fn is not None and eval_every and (step + 1) % eval_every == 0:
                # the measurement in eval mode, then back to training
                model.eval()
                hist["curve"].append({"step": step + 1, **eval_fn(model)})
                model.train()
            if on_step is not None:  # step + 1 steps are done: where a run resumed from this checkpoint starts
                on_step(step + 1, model, opt, hist)
    finally:  # also on an error or an interrupt: eval mode, and the frozen biases trainable again
        model.eval()
        for b in frozen:
            b.requires_grad_(True)
    return hist


def train(model, seqs: list[Seq], *, steps: int, batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.1,
          warmup: int | None = None, grad_clip: float = 1.0, pad_id: int = 0, seed: int = 0, desc: str = "train",
          progress: bool = True) -> dict:
    """Plain training (pretraining, alignment, SFT): the CWAC loop with no constraint. Returns step, loss, lr."""
    h = finetune_cwac(model, seqs, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      warmup=warmup, grad_clip=grad_clip, pad_id=pad_id, seed=seed, desc=desc, progress=progress)
    return {k: h[k] for k in ("step", "loss", "lr")}
