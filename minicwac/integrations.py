"""CWAC inside transformers' `Trainer` and the trainers built on it (TRL's `SFTTrainer`), on one process.

    trainer = Trainer(model=model, args=args, train_dataset=data, ...)   # built as usual
    run = add_cwac(trainer, Kit.load("path/to/kit", model))               # both sides, before train()
    trainer.train()                                                       # logs l_safety and ws_error

The weight side is a callback (`CWACCallback`, usable alone): a hook on every constrained weight projects its
gradient after each backward (g <- g - (g S) S^T), so the Trainer clips the same gradient `cwac_step` clips, and
after every optimizer step the weights are put back on the constraint (W <- W - (W S - W0S) S^T; on a PEFT LoRA
model A <- A - (A S) S^T). The activation side wraps the trainer's `compute_loss`: lam * L_safety on harmful
calibration prompts drawn per optimizer step, split over the step's micro-batches so that the sum over them is the
same term as in one big batch. docs/trainers.md explains each choice and the setups that are refused.
"""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from .core.cwac import warn_low_precision
from .core.features import SafetyFeatures
from .core.lora import constrain_peft_
from .core.settings import SEED_SAFETY, cwac_method
from .core.subspace import Subspace, project_out_
from .kit.calibration import Kit, fingerprint, same_model

TORCHRUN = "use `torchrun -m minicwac finetune` for a sharded or data-parallel run"
# the W S = W0 S error a model may start from: the bound `Kit.load` holds a kit's model to
START_TOL = 1e-4


def refusal(args, trainer=None, optimizer=None) -> str | None:
    """Why the weight side cannot run exactly in this training setup (one line), or None. Read from the training
    arguments, and from the trainer and its optimizer once they exist."""
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    if getattr(args, "deepspeed", None) or getattr(trainer, "is_deepspeed_enabled", False):
        return ("DeepSpeed is not supported: its optimizer steps inside backward (the wrapper's step() does nothing), "
                "the gradients are partitioned and fp32 master weights overwrite any edit of the model's weights; "
                f"train without DeepSpeed, or {TORCHRUN}")
    if getattr(args, "fsdp", None) or getattr(trainer, "is_fsdp_enabled", False):
        plugin = getattr(state, "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", None) or int((getattr(args, "fsdp_config", None) or {}).get(
            "version", 2))
        if version == 1:
            return ("FSDP1 is not supported: it flattens the parameters, so a weight cannot be projected by its name; "
                    f"{TORCHRUN} (FSDP2, the constraint kept on each rank's rows)")
        return (f"accelerate's FSDP2 is not supported by add_cwac; {TORCHRUN} (FSDP2, the constraint on each rank's "
                "rows)")
    optim = str(getattr(args, "optim", "") or "").lower().removeprefix("optimizernames.")
    while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer wraps the trainer's
        optimizer = optimizer.optimizer
    layerwise = optim.endswith("layerwise") or type(optimizer).__name__ == "LayerWiseDummyOptimizer"
    if layerwise or optim in ("lomo", "adalomo"):
        name = type(optimizer).__name__ if type(optimizer).__name__ == "LayerWiseDummyOptimizer" else optim
        return (f"optimizer {name} steps inside the backward pass, where no callback "
                "sees it: the weights could not be projected after each step; use an optimizer that steps in "
                "optimizer.step() (adamw_torch, the default)")
    if getattr(args, "world_size", 1) > 1 or getattr(args, "n_gpu", 1) > 1:
        return (f"add_cwac runs on one process and one device (this run has {getattr(args, 'world_size', 1)} "
                f"processes, {getattr(args, 'n_gpu', 1)} devices); {TORCHRUN}")
    return None


def _check(args, trainer=None, optimizer=None) -> None:
    why = refusal(args, trainer, optimizer)
    if why is not None:
        raise ValueError(why)


def _is_peft(module) -> bool:
    """A PEFT LoRA layer: one lora_A per adapter name, in a ModuleDict."""
    return isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict)


def _root(model, sub: Subspace) -> torch.nn.Module:
    """The module of `model` under which the subspace's layer names are its own: `model` itself, or the model a
    wrapper holds (PEFT's base_model.model, DDP's module, torch.compile's _orig_mod)."""
    name = next(iter(sub.S))
    names = [n for n, _ in model.named_modules()]
    hits = [n for n in names if n == name or n.endswith("." + name)]
    if not hits:
        raise ValueError(f"the model has no layer {name!r} (nor one ending in it): the kit was made for another "
                         "model; calibrate one on this model")
    prefix = min(hits, key=len)[:-len(name)].rstrip(".")
    return model.get_submodule(prefix) if prefix else model


class CWACCallback(TrainerCallback):
    """The weight side of CWAC in a transformers Trainer: W S = W0 S exactly after every optimizer step.

    On train begin: the setup is checked (`refusal`), the constrained layers' biases are frozen and a hook on each
    trainable constrained weight (on a PEFT model, each lora_A) projects its gradient after every backward, before
    the Trainer clips. After each optimizer step (on_optimizer_step): W <- W - (W S - W0S) S^T, or on a PEFT LoRA
    model A <- A - (A S) S^T. On train end the hooks are removed and the biases trainable again."""

    def __init__(self, subspace: Subspace):
        if not isinstance(subspace, Subspace) or not subspace.S:
            raise ValueError(f"CWACCallback needs a Subspace with at least one layer (got {type(subspace).__name__}); "
                             "take it from a kit: kit.constraint('weight')[0]")
        self.subspace = subspace
        self._hooks, self._frozen = [], []

    def _prepare(self, model) -> None:
        """Resolve the constrained layers in `model` (S beside them), split into full weights and PEFT LoRA layers,
        and check the starting weights."""
        self.root = _root(model, self.subspace)
        sub = self.subspace.to(next(self.root.parameters()).device)
        mods = dict(self.root.named_modules())
        missing = [n for n in sub.S if n not in mods]
        if missing:
            raise ValueError(f"the model has no layer {missing[0]!r} of the kit's subspace: the kit was made for "
                             "another model; calibrate one on this model")
        lora = [n for n in sub.S if _is_peft(mods[n])]
        if any(mods[n].get_base_layer().weight.requires_grad for n in lora):
            raise ValueError("the PEFT model trains the constrained base weights too (modules_to_save?): only the "
                             "LoRA form A S = 0 is supported on a PEFT model; leave those layers' weights frozen")
        full = [n for n in sub.S if n not in lora]
        # the full weights (and minicwac's own LoRA layers) project by Subspace.project_, PEFT's by constrain_peft_
        self.full = sub.subset(full) if full else None
        self.lora = sub.subset(lora) if lora else None
        if self.full is not None:
            warn_low_precision(self.root, self.full)
        err = self.ws_error()  # also checks every layer's shape against S and W0S
        if not err <= START_TOL:
            raise ValueError(f"the model's weights are not those the subspace was made from: |W S - W0S| / |W0S| = "
                             f"{err:.2g} before training (expected <= {START_TOL:g}); use the kit of this model")

    def _trainable(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, S) for every trainable constrained weight: the full weights, or the LoRA A matrices."""
        mods, out = dict(self.root.named_modules()), []
        for name, S in (self.full.S if self.full is not None else {}).items():
            m = mods[name]
            w = m.lora_A if hasattr(m, "lora_A") else m.weight  # minicwac's own LoRA layer: its A
            out += [(w, S)] if w.requires_grad else []
        for name, S in (self.lora.S if self.lora is not None else {}).items():
            out += [(lin.weight, S) for lin in mods[name].lora_A.values() if lin.weight.requires_grad]
        return out

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _check(args, optimizer=optimizer)
        self._release()  # a second train() on the same trainer: no hook twice
        self._prepare(model)
        # a target's bias would move its output on the protected inputs (GPT-2 and Qwen2 have some): frozen, as
        # finetune_cwac freezes it
        self._frozen = [b for b in self.full.biases(self.root) if b.requires_grad] if self.full is not None else []
        for b in self._frozen:
            b.requires_grad_(False)

        def hook_for(S):
            # after every backward, on every micro-batch: projection is linear and idempotent, so the accumulated
            # gradient is the projected sum, and the Trainer's clip norm is measured on it
            def hook(p):
                if p.grad is not None:
                    project_out_(p.grad, S, torch.float32)
            return hook

        self._hooks = [p.register_post_accumulate_grad_hook(hook_for(S)) for p, S in self._trainable()]

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.project()

    def on_train_end(self, args, state, control, **kwargs):
        self._release()

    def _release(self) -> None:
        for h in self._hooks:
            h.remove()
        for b in self._frozen:
            b.requires_grad_(True)
        self._hooks, self._frozen = [], []

    @torch.no_grad()
    def project(self) -> None:
        """The weight constraint, now: W <- W - (W S - W0S) S^T (PEFT LoRA: A <- A - (A S) S^T)."""
        if self.full is not None:
            self.full.project_(self.root)
        if self.lora is not None:
            constrain_peft_(self.root, self.lora)

    @torch.no_grad()
    def ws_error(self) -> float:
        """max over the constrained layers of |W S - W0S| / |W0S|, W the effective weight (with LoRA: W0 + B A)."""
        out = self.full.ws_error(self.root) if self.full is not None else 0.0
        mods = dict(self.root.named_modules())
        for name, S in (self.lora.S if self.lora is not None else {}).items():
            m, W0S = mods[name], self.lora.W0S[name]
            err = m.get_base_layer().weight.to(S.dtype) @ S - W0S  # (out, k)
            for a, A in m.lora_A.items():  # + scale B (A S), per adapter; (A S) first: B A is never formed
                err = err + m.scaling[a] * m.lora_B[a].weight.to(S.dtype) @ (A.weight.to(S.dtype) @ S)
            out = max(out, float(err.norm() / W0S.norm().clamp(min=1e-30)))
        return out


class SafetyLoss(TrainerCallback):
    """The activation side in a Trainer: lam * L_safety added to the loss `compute_loss` returns (`add_cwac` wraps
    it). Per optimizer step, `safety_batch` calibration prompts are drawn from a generator seeded
    `args.seed + SEED_SAFETY` (the step's picks depend on its index only: a resumed run draws the same), split in
    order over the step's micro-batches; micro-batch i adds lam * (its prompts' summed per-token loss) / (the
    kept tokens of all the step's picks), so the micro-batches add up to lam * L_safety of the whole draw, scaled
    back up when the Trainer divides each micro-batch's loss by the accumulation steps."""

    def __init__(self, trainer, features: SafetyFeatures, lam: float, safety_batch: int):
        self.trainer, self.features, self.lam, self.safety_batch = trainer, features, lam, safety_batch
        self.history = {"step": [], "l_safety": []}  # per optimizer step: L_safety over that step's draw
        self._pending = []  # the steps' L_safety since the last log
        self._reset()

    def _reset(self) -> None:
        self._gen, self._drawn, self._picks = None, 0, None
        self.step, self.micro, self.active, self._value = None, 0, False, 0.0

    def picks(self, step: int) -> torch.Tensor:
        """The calibration prompts of optimizer step `step` (indices, on the CPU): the step-th draw of the seeded
        generator, as `finetune_cwac` draws them."""
        if self._gen is None or self._drawn > step + 1:  # a new run, or a step before the last one drawn: replay
            self._gen, self._drawn = torch.Generator().manual_seed(self.trainer.args.seed + SEED_SAFETY), 0
        while self._drawn <= step:
            self._picks = torch.randint(len(self.features.ids), (self.safety_batch,), generator=self._gen)
            self._drawn += 1
        return self._picks

    def begin_micro_batch(self) -> None:
        """Called at the start of each training_step: which optimizer step and which of its micro-batches runs."""
        step = self.trainer.state.global_step
        self.micro = self.micro + 1 if step == self.step else 0
        self.step = step

    def term(self, model, num_items_in_batch=None) -> torch.Tensor | None:
        """This micro-batch's lam * L_safety part, in the scale the Trainer's backward expects; None when it draws
        no prompt (more micro-batches than safety_batch)."""
        n_micro = int(getattr(self.trainer, "current_gradient_accumulation_steps", None)
                      or self.trainer.args.gradient_accumulation_steps)
        if self.micro >= n_micro:
            raise RuntimeError(f"micro-batch {self.micro + 1} of an optimizer step of {n_micro}: the trainer's loop is "
                               "not the one add_cwac knows (training_step called more than once per micro-batch?)")
        f = self.features
        picks = self.picks(self.step).to(f.ids.device)
        part = picks.tensor_split(n_micro)[self.micro]  # contiguous, as even as possible; together: every pick
        if not len(part):
            return None
        n_tokens = int(f.keep[picks].sum())  # the kept tokens of the whole draw: the mean's denominator
        loss = f.loss(model, part, n_tokens)  # this part's sum over its tokens / n_tokens
        if torch.is_grad_enabled() and not loss.requires_grad:
            raise ValueError("L_safety has no gradient: the residual stream was read without a graph (reentrant "
                             "activation checkpointing?); use activation_checkpointing_kwargs={'use_reentrant': False}")
        self._value += float(loss.detach())
        # The Trainer divides each micro-batch's loss by the accumulation steps unless it is already normalised
        # over the whole step (num_items_in_batch): the same test as its training_step, so that our term, which
        # is normalised over the whole draw, reaches the gradient once, not 1 / n_micro times
        scaled = getattr(self.trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self.trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) \
                or getattr(self.trainer, "compute_loss_func", None) is not None
        return self.lam * loss * (1 if scaled else n_micro)

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset()

    def on_step_end(self, args, state, control, **kwargs):
        # the step just taken is global_step - 1; its L_safety is the sum of its micro-batches' parts
        if self.step is not None:
            self.history["step"].append(self.step)
            self.history["l_safety"].append(self._value)
            self._pending.append(self._value)
        self._value = 0.0

    def logged(self) -> float | None:
        """The mean L_safety of the steps since the last log (None: none), and a fresh start for the next log."""
        vals, self._pending = self._pending, []
        return sum(vals) / len(vals) if vals else None


class CWACRun:
    """What `add_cwac` put on a trainer: `weight` (a CWACCallback, or None for an activation-only method) and
    `safety` (a SafetyLoss, or None for a weight-only method or lam = 0); `history` holds L_safety per step."""

    def __init__(self, weight: CWACCallback | None, safety: SafetyLoss | None):
        self.weight, self.safety = weight, safety

    @property
    def history(self) -> dict:
        return self.safety.history if self.safety is not None else {"step": [], "l_safety": []}

    def ws_error(self) -> float | None:
        """|W S - W0S| / |W0S| now, the worst constrained layer (None: no weight side)."""
        return None if self.weight is None else self.weight.ws_error()


def add_cwac(trainer, kit: Kit, method: str | None = None, lam: float | None = None,
             safety_batch: int = 8) -> CWACRun:
    """Make `trainer.train()` a CWAC run: a transformers `Trainer` or any subclass (TRL's `SFTTrainer`), already
    built, and the kit of its model (`Kit.load(path, model)`). method: a row of `core.settings.METHODS` that a kit
    serves ("cwac", "weight", "activation", "cwac-all", ...; None: CWAC on the targets the kit was made for, as
    `finetune`'s default). lam: the weight of L_safety (None: the kit's). safety_batch: calibration prompts per
    optimizer step for L_safety.

    The setups where the method cannot be exact are refused here, in one line (`refusal`); so is a kit of another
    model. Adds l_safety and ws_error to the trainer's training logs. Returns a `CWACRun`."""
    if not isinstance(kit, Kit):
        raise ValueError(f"add_cwac takes a Kit (Kit.load(path, model)), got {type(kit).__name__}")
    if getattr(trainer, "_cwac", None) is not None:
        raise ValueError("this trainer already has CWAC (add_cwac was called on it before)")
    if not hasattr(trainer, "compute_loss") or not hasattr(trainer, "add_callback"):
        raise ValueError(f"add_cwac takes a transformers Trainer (or a subclass), got {type(trainer).__name__}")
    method = cwac_method(kit.settings.targets) if method is None else method
    lam = kit.settings.lam if lam is None else lam
    if not lam >= 0:  # NaN too
        raise ValueError(f"lam={lam}, expected >= 0")
    if isinstance(safety_batch, bool) or not isinstance(safety_batch, int) or safety_batch < 1:
        raise ValueError(f"safety_batch={safety_batch!r}, expected a positive number of prompts")
    _check(trainer.args, trainer, getattr(trainer, "optimizer", None))
    sub, feats = kit.constraint(method, "kit")  # a method the kit cannot serve: its own one-line error
    if sub is None and feats is None:
        raise ValueError(f"method {method!r} adds no constraint: train without add_cwac, or use cwac, weight or "
                         "activation")
    model = trainer.model
    root = _root(model, kit.subspace)
    fp = fingerprint(root)
    if not same_model(kit.fingerprint, fp):
        raise ValueError(f"the kit was made for another model ({kit.fingerprint.get('params')} parameters in "
                         f"{kit.fingerprint.get('n_tensors')} tensors); the trainer's has {fp['params']} in "
                         f"{fp['n_tensors']}: calibrate a kit on this model")
    weight = None
    if sub is not None:
        weight = CWACCallback(sub)
        weight._prepare(model)  # shapes, PEFT form and W S = W0 S checked now, before training
        trainer.add_callback(weight)
    safety = None
    if feats is not None and lam > 0:  # lam = 0: no safety forward at all, as in finetune_cwac
        safety = SafetyLoss(trainer, feats, lam, safety_batch)
        trainer.add_callback(safety)
        _wrap_steps(trainer, safety)
    _wrap_log(trainer, weight, safety)
    trainer._cwac = run = CWACRun(weight, safety)
    return run


def _wrap_steps(trainer, safety: SafetyLoss) -> None:
    """The activation side on the trainer instance: training_step says which micro-batch runs; compute_loss adds
    that micro-batch's part of lam * L_safety, computed through the model object the trainer passes it. Evaluation
    calls compute_loss outside training_step and gets no term."""
    step_fn, loss_fn = trainer.training_step, trainer.compute_loss

    def training_step(*args, **kwargs):
        safety.begin_micro_batch()
        safety.active = True
        try:
            return step_fn(*args, **kwargs)
        finally:
            safety.active = False

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        out = loss_fn(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not safety.active:
            return out
        extra = safety.term(model, num_items_in_batch)
        if extra is None:
            return out
        return (out[0] + extra, *out[1:]) if return_outputs else out + extra

    trainer.training_step, trainer.compute_loss = training_step, compute_loss


def _wrap_log(trainer, weight: CWACCallback | None, safety: SafetyLoss | None) -> None:
    """Training logs (those with "loss") get l_safety (the mean over the steps since the last log) and ws_error
    (now), before the trainer hands them to its history, progress output and report_to integrations."""
    log_fn = trainer.log

    def log(logs, *args, **kwargs):
        if "loss" in logs:
            value = safety.logged() if safety is not None else None
            if value is not None:
                logs["l_safety"] = value
            if weight is not None:
                logs["ws_error"] = weight.ws_error()
        return log_fn(logs, *args, **kwargs)

    trainer.log = log
