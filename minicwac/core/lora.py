"""LoRA with CWAC's weight constraint made exact on the adapter.

    W = W0 + (alpha / r) B A          A: (r x in), B: (out x r); W0 frozen, B starts at 0
    after every step:  A <- A - (A S) S^T

Then A S = 0, so (W - W0) S = (alpha / r) B (A S) = 0 whatever B and the optimizer do: the layer's response to the
safety subspace is the aligned model's, as with the full-weight constraint W <- W - (W S - W0S) S^T (which needs
W0S; the adapter's needs only S). `Subspace.project_` does this for every target that carries an adapter.

    names = add_lora(model, r=16, alpha=32)       # every linear of every block by default; the rest frozen
    ... fine-tune (finetune_cwac with the kit's subspace: A is projected after each step) ...
    save_adapter(model, "adapter/")                # PEFT's layout: adapter_config.json + adapter_model.safetensors
    load_adapter(model, "adapter/")                # ... and back onto a base model
    merge_lora(model)                              # or fold B A into W: a plain model for save_pretrained

`constrain_peft_` applies the same projection to a PEFT model's `lora_A` weights, for users who train with peft.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .files import atomic_folder, read_json
from .subspace import project_out_

# the seven linears of a Llama-style block, by their name endings (PEFT's target_modules)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRASettings:
    r: int = 16  # the adapter's rank: A is (r, in), B is (out, r)
    alpha: float | None = None  # None: 2 r (a scale of 2)
    target_modules: tuple[str, ...] = LINEARS  # module name endings inside the decoder blocks (PEFT's name)

    def check(self) -> "LoRASettings":
        # bool is a subclass of int: r=True would pass as 1
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora r={self.r!r}, expected a positive integer")
        if self.alpha is not None and not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"lora alpha={self.alpha!r}, expected a finite number > 0")
        bad = [t for t in self.target_modules if t not in LINEARS]  # names outside the block's seven linears
        if bad or not self.target_modules:
            raise ValueError(f"lora targets {list(bad or self.target_modules)}: expected some of {', '.join(LINEARS)}")
        self.target_modules = tuple(self.target_modules)  # a list from JSON or argparse, kept as a tuple
        return self

    @property
    def scale(self) -> float:
        # alpha / r: the factor of B A in W0 + scale B A
        return (2 * self.r if self.alpha is None else self.alpha) / self.r


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (same weight and bias parameters, same name in the model) plus a trainable B A."""

    def __init__(self, base: nn.Linear, r: int, scale: float):
        nn.Module.__init__(self)  # not nn.Linear's own __init__: it would allocate and draw a new weight
        # read by `init_lora_` and `merge_lora`
        self.in_features, self.out_features = base.in_features, base.out_features
        # the same Parameter objects: no copy, state-dict names unchanged
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)  # W0 frozen: only A and B train
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # beside W0, in its dtype (the meta device included)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))  # (r, in), drawn by `init_lora_`
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))  # (out, r): B = 0, so W = W0 at the start
        self.r, self.scale = r, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # W0 x + scale B (A x): (..., in) -> (..., r) -> (..., out); B A (out, in) is never formed
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def merged(self) -> torch.Tensor:
        """W0 + scale B A."""
        return self.weight + self.scale * self.lora_B @ self.lora_A  # (out, in)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}  # name -> adapter, in module order


def add_lora(model: nn.Module, settings: LoRASettings, seed: int = 0) -> list[str]:
    """Put an adapter on every `settings.target_modules` linear of every decoder block (in place) and freeze every other
    parameter; A drawn from `seed`. Returns the adapted module names (the subspace's names:
    model.layers.{i}.mlp.down_proj, ...)."""
    from .hooks import block_list
    settings.check()
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters")
    blocks, _ = block_list(model)  # e.g. "model.layers"
    # "<blocks>.<i>.<anything>.<target>": linears inside the decoder blocks only (never lm_head)
    rx = re.compile(re.escape(blocks) + r"\.\d+\..*\.(" + "|".join(settings.target_modules) + ")")
    # type(m) is nn.Linear, not isinstance: a LoRALinear is an nn.Linear too
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and rx.fullmatch(n)]
    if not names:
        raise ValueError(f"no linear layer named {', '.join(settings.target_modules)} in the decoder blocks")
    # an update B A has rank at most min(in, out): a larger r only adds parameters (said, not silently kept)
    full = min(min(model.get_submodule(n).weight.shape) for n in names)
    if settings.r > full:
        warnings.warn(f"lora r={settings.r} is more than the rank a target's update can have ({full} = min(in, out) "
                      "of its smallest target): the adapters hold more parameters but fit no more", stacklevel=2)
    # everything frozen first: the adapters made below hold the only trainable parameters
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        parent, _, child = n.rpartition(".")  # e.g. "model.layers.0.mlp", "down_proj"
        # swapped in under the same name, so the subspace, the hooks and the state dict find it there
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(n), settings.r, settings.scale))
    if next(model.parameters()).device.type != "meta":  # a model built on the meta device is drawn once it exists
        init_lora_(model, seed)
    return names


@torch.no_grad()
def init_lora_(model: nn.Module, seed: int = 0) -> None:
    """B = 0 and A drawn as nn.Linear (and PEFT) draw it, U(-1/sqrt(in), 1/sqrt(in)), from one generator seeded
    `seed`, module by module: the same values on one process and on every row-sharded rank (each keeps its rows)."""
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same draws whatever the device
    for m in lora_modules(model).values():  # module order is fixed: every process draws the same A for the same module
        bound = 1 / math.sqrt(m.in_features)  # nn.Linear's own bound (kaiming_uniform_ with a=sqrt(5))
        # the full-size tensor is drawn on every process; a row-sharded rank keeps its own rows (`_set`)
        _set(m.lora_A, torch.rand(tuple(m.lora_A.shape), generator=g) * 2 * bound - bound)
        _set(m.lora_B, torch.zeros(tuple(m.lora_B.shape)))  # B = 0: the adapted model starts as W0


def _set(p: torch.Tensor, full: torch.Tensor) -> None:
    """p <- full; a row-sharded p (a DTensor) takes its own rows of `full`."""
    if hasattr(p, "device_mesh"):  # a DTensor (FSDP2)
        from torch.distributed.tensor import distribute_tensor
        # src_data_rank=None: no broadcast; each rank cuts its rows from its own, identical `full`
        full = distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(full.to_local())  # in place: the optimizer keeps the same Parameter
    else:
        p.copy_(full)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W0 + scale B A) and put back plain nn.Linear modules, trainable."""
    for n, m in lora_modules(model).items():
        # on the meta device: nothing allocated or drawn; the merged weight is put in below
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(m.merged())  # (out, in): W0 + scale B A
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach())
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, lin)  # the plain linear takes the adapter's place
    # add_lora froze every parameter: the merged model trains as a whole again
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_adapter(model: nn.Module, path: str | Path, settings: LoRASettings, base_model: str | None = None) -> Path:
    """The adapters as a PEFT adapter folder: adapter_model.safetensors (base_model.model.<name>.lora_A.weight,
    ...lora_B.weight) and adapter_config.json. peft's PeftModel.from_pretrained loads it onto the transformers
    model of the same folder (Llama-style families; GPT-2's fused layout differs: save it merged)."""
    if getattr(getattr(model, "config", None), "model_type", None) == "gpt2":
        raise ValueError("a GPT-2 adapter cannot be written in PEFT's layout (GPT-2 fuses q, k, v): save merged")
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    tensors = {}
    # PEFT's key names: PeftModel.base_model (a LoraModel) wraps the transformers model as .model
    for n, m in mods.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = m.lora_B.detach().cpu().contiguous()
    # lora_alpha = scale * r: PEFT scales B A by lora_alpha / r (use_rslora off), the same factor
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.r, "lora_alpha": settings.scale * settings.r,
           "target_modules": sorted({n.rsplit(".", 1)[1] for n in mods}), "lora_dropout": 0.0, "bias": "none",
           "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
           "base_model_name_or_path": base_model, "modules_to_save": None, "use_rslora": False, "use_dora": False}
    with atomic_folder(path) as tmp:  # all three files or none
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        # our own record of the settings (alpha None stays None); PEFT ignores it
        (tmp / "minicwac_lora.json").write_text(json.dumps(asdict(settings)))
    return Path(path)


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path, seed: int = 0) -> LoRASettings:
    """Put the adapters of a PEFT-layout folder (`save_adapter`'s, or peft's own LoRA with default settings) onto
    `model` (in place). Returns their settings; every tensor is checked against the model's shapes."""
    from safetensors.torch import load_file
    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: an adapter folder has adapter_config.json and "
                                    "adapter_model.safetensors")
    cfg = read_json(cfg_file, "a PEFT adapter config (a JSON object)")
    try:
        # lora_alpha is read as alpha: scale = lora_alpha / r, as PEFT computes it
        settings = LoRASettings(int(cfg["r"]), float(cfg["lora_alpha"]), tuple(cfg["target_modules"])).check()
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_file} is not a LoRA adapter config this package reads ({type(e).__name__}: {e})") \
            from None
    # forms whose forward is not W0 x + scale B A x: refused rather than loaded wrong
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("bias", "none") != "none":
        raise ValueError(f"{cfg_file}: DoRA, rsLoRA and trained biases are not supported")
    tensors = load_file(str(weights))  # name -> tensor, on the CPU
    names = add_lora(model, settings, seed)  # adapters with A drawn from `seed`, overwritten below
    # every key the model's adapters need -> (module name, "A" or "B")
    want = {f"base_model.model.{n}.lora_{x}.weight": (n, x) for n in names for x in "AB"}
    if set(tensors) != set(want):  # a missing or an extra adapter is an error, never skipped
        odd = sorted(set(tensors) ^ set(want))
        raise ValueError(f"{weights}: tensor {odd[0]} is {'unexpected' if odd[0] in tensors else 'missing'} "
                         f"({len(odd)} names differ from the model's adapters)")
    mods = lora_modules(model)
    for key, (n, x) in want.items():
        p = getattr(mods[n], f"lora_{x}")  # lora_A (r, in) or lora_B (out, r)
        if tuple(tensors[key].shape) != tuple(p.shape):
            raise ValueError(f"{weights}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(p.shape)}")
        p.copy_(tensors[key])  # into the model's device and dtype
    return settings


@torch.no_grad()
def constrain_peft_(peft_model: nn.Module, subspace) -> int:
    """The exact constraint on a PEFT LoRA model: lora_A <- lora_A - (lora_A S) S^T on every adapter of every module
    the subspace names (call it after each optimizer step). Returns how many lora_A weights were projected."""
    modules = dict(peft_model.named_modules())
    n = 0
    for name, S in subspace.S.items():
        # PEFT prefixes the names (base_model.model....): a subspace layer is found by its name's ending (or by its
        # own name, in the model a PeftModel wraps)
        hits = [m for k, m in modules.items() if (k == name or k.endswith("." + name)) and hasattr(m, "lora_A")]
        if not hits:
            raise ValueError(f"no LoRA module for the subspace layer {name!r} in the PEFT model")
        for m in hits:
            for lin in m.lora_A.values():  # PEFT keeps one lora_A per adapter name (a ModuleDict)
                project_out_(lin.weight, S, torch.float32)  # (r, in): A S = 0, in float32 whatever S's dtype
                n += 1
    return n
