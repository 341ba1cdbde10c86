"""Memory plan (`python -m minicwac plan`): the bytes per GPU of a sharded fine-tune, before running it.

The figures describe the run `minicwac.io.dist` makes (FSDP2, started by torchrun, with one or more processes), for
rank 0 of N. They are counted from the model's own parameter names and shapes (`GPT(cfg, device="meta")`; a tied
head counts once), not from a formula in the parameter count:

- sharding: `fully_shard` on every decoder block, then on the root (embeddings, final norm, head). Every tensor is
  split by rows (dim 0) over the N ranks with `torch.chunk` semantics; rank 0 holds ceil(d0 / N) rows of each
  (FSDP2 pads every rank to that), one-dimensional tensors (norm weights) too. N = 1: the same arithmetic.
- master weights (fp32 shards): 4 bytes x the sharded numel of every parameter, frozen ones (LoRA's base) too.
- compute copies (gathered units): FSDP2 gathers one block at a time plus one prefetched, in the compute dtype
  (e = 2 bytes for bf16-mixed, 4 for fp32): e x the numel of the two largest blocks; the root unit stays gathered
  from the start of the forward to the end of the backward: + e x its numel.
- gradients (fp32 shards): 4 bytes x the sharded numel of the trainable parameters. Full fine-tuning trains every
  parameter except the biases of constrained linears (Llama has none); LoRA trains only its A and B.
- gradient buffers (backward, an estimate): the unsharded gradients of a gathered unit before its reduce-scatter:
  e x the root's trainable numel (the head's gradient is made at the start of the backward, the embedding's at
  the end; both wait for the root's reduce-scatter) + (e + 4) x the largest block's trainable numel (its
  gradients in the compute dtype and their float32 copy-in for the reduce-scatter).
- AdamW states: exp_avg and exp_avg_sq, float32, sharded like the trainable parameters (8 bytes x their sharded
  numel), plus one float32 `step` per trainable tensor (4 bytes each).
- subspace (the weight constraint): per constrained linear, S (in x k) float32, whole on every rank, and
  W0S = W0 S (out x k) float32, sharded by rows: ceil(out / N) x k. k = round(rank_frac x in), at least 1.
  Targets: cwac every `mlp.down_proj`, cwac-all every linear of every block, sft none. With LoRA the constraint
  acts on the adapters (A <- A - (A S) S^T, so A S = 0), but the run still holds the kit's S and W0S of every
  constrained linear (`Subspace.shard`), so the line is the same as with full fine-tuning.
- LoRA (lora_r = R, `core.lora`): A (R x in) and B (out x R) float32 on each target linear (default: every linear
  of every block), both trained and sharded by rows like any parameter (ceil(R / N) x in, ceil(out / N) x R);
  everything else is frozen.
- offload (CPUOffloadPolicy): the master shards, gradients, AdamW states and the subspace live in CPU memory
  (reported as CPU bytes per rank); the GPU keeps the compute copies, the gradient buffers and the activations.

Activations (an estimate). For B x T tokens per GPU (`batch_size` x `seq_len`), d = hidden, I = intermediate,
q = heads x head_dim, kv = kv_heads x head_dim, h = heads, what one Llama block saves for backward with SDPA
(flash or memory-efficient attention: no T x T matrix), per token, in bytes:

    a = 8 d + 8 + e (4 d + 2 q + 2 kv + 4 I) + 4 h          (bf16-mixed: 2 (8 d + 4 I + 2 q + 2 kv) + 4 h + 8)

  each RMSNorm: the float32 copy of its input and its rsqrt (4 d + 4), its normalised input before the weight and
  its output (2 e d); attention: q and k after RoPE, v, the SDPA output (also o_proj's input) (e (2 q + 2 kv))
  and SDPA's float32 log-sum-exp (4 h); MLP: gate, act(gate), up and their product (4 e I). With LoRA (frozen
  base and norms) a norm keeps no normalised input (- e d each), the input of a frozen linear that no LoRA
  target shares is not kept, and each target adds A x (+ e R). Once per forward: the ids, RoPE's cos and sin,
  the final norm and the head's input (8 + 2 e head_dim + 4 d + 4 + 2 e d; with LoRA, whose embedding, norms and
  head are frozen: 2 e head_dim, as the first block's input norm then keeps no float32 copy either).
  Without gradient checkpointing: tokens x (layers x a + once). With it: tokens x (layers x e d + a + once)
  (each block keeps only its input; one block's activations are rebuilt at a time in the backward).
- logits: the head's output upcast to float32 for the cross-entropy. At the peak (the backward of log-softmax)
  three float32 tensors of tokens x vocab are alive: the log-probabilities, their gradient, and the gradient of
  the logits: 3 x 4 x tokens x vocab.
- L_safety's partial forward (methods with the activation constraint, cwac and cwac-all): a safety batch of
  `safety_prompts` (16, finetune's default, split over the ranks: ceil(16 / N) each) x `safety_len` (64) tokens
  through `safety_layers` blocks (default: half of them, the SAE in the middle), by the same rule as the task
  batch. The SAE's latents are left out (tokens x latents x 4 bytes: small).

The total adds the rows as if they all peaked at once; the logits' peak (the start of the backward) and a block's
gradient buffers (after its backward) do not coincide, so it is high by up to the smaller of the two. Whether it
fits: the GPU total must be at most 95% of the card's memory (a 5% reserve for the allocator's fragmentation and
the CUDA context). Memory sizes are in GB of 1e9 bytes. Not counted: temporaries of single ops (the optimizer
step's, attention's workspace) and NCCL's buffers. Not described: a plain single-process run (no torchrun), where
autocast also keeps a bf16 copy of every weight.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch

from ..core.lora import LINEARS
from ..core.settings import METHODS, TARGETS, methods_for
from ..core.subspace import target_names
from ..io.config import Config
from ..io.model import GPT

# Model shapes by name, published ones (random init: speed and memory do not depend on the weights); `tiny` is for
# CPU runs. `bench` times the first three.
SHAPES = {
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     rope_theta=500000.0, max_position_embeddings=8192),
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                     max_position_embeddings=8192),
    "llama-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False,
                      max_position_embeddings=8192),
}
PRESET_NAMES = tuple(SHAPES)
# the methods a plan can be made for: the kit's, but "-auto" (its targets are known only once its probe ran)
PLAN_METHODS = tuple(m for m in methods_for("kit") if METHODS[m].weight != "auto")

DTYPE_BYTES = {"bf16-mixed": 2, "fp32": 4}
RESERVE = 0.05  # of the card's memory, for the allocator and the CUDA context
GB = 1e9
DEFAULT_GPU_MEMS = (80, 141)
# k / in at energy 0.99: the toy model's down_proj 0.39-0.57 (3 seeds x 4 layers), SmolLM2-135M-Instruct's 0.33 on
# average (0.07-0.42; 200 AdvBench prompts); 0.5 errs on the side of more memory
DEFAULT_RANK_FRAC = 0.5
SAFETY_PROMPTS, SAFETY_LEN = 16, 64

ROWS = (  # key, label, moved to the CPU by offload
    ("weights", "master weights (fp32 shards)", True),
    ("compute", "compute copies (gathered units)", False),
    ("grads", "gradients (fp32 shards)", True),
    ("grad_buffers", "gradient buffers (gathered units, backward; estimate)", False),
    ("adam", "AdamW states (exp_avg, exp_avg_sq, step)", True),
    ("subspace", "subspace (S whole, W0S shards)", True),
    ("activations", "activations (estimate)", False),
    ("logits", "logits and their gradients (fp32)", False),
    ("safety", "L_safety partial forward (estimate)", False),
)


# --- inputs ---------------------------------------------------------------------------------------------------
def resolve_shape(shape) -> tuple[str, Config]:
    """(name, Config) of a preset name, a Hugging Face model folder (its config.json) or a Config."""
    if isinstance(shape, Config):
        return "custom", shape
    s = str(shape)
    if s in PRESET_NAMES:
        return s, Config(**SHAPES[s])
    path = Path(s)
    if not (path / "config.json").is_file():
        raise ValueError(f"shape={s!r} is neither a preset ({', '.join(PRESET_NAMES)}) nor a model folder with "
                         "config.json")
    from ..io.hf import read_config
    return path.name or s, read_config(path)


def kit_rank_frac(kit) -> float:
    """The mean k / in over the targets listed in KIT/kit.json (report.ranks: {name: [k, in]})."""
    f = Path(kit) / "kit.json"
    if not f.is_file():
        raise ValueError(f"kit={str(kit)!r}: {f} not found; expected a kit folder written by calibrate")
    try:
        ranks = json.loads(f.read_text())["report"]["ranks"]
        fracs = [k / d for k, d in ranks.values()]
    except (ValueError, KeyError, TypeError, ZeroDivisionError, AttributeError):
        raise ValueError(f"{f}: expected report.ranks as {{name: [k, in]}}") from None
    if not fracs:
        raise ValueError(f"{f}: report.ranks lists no layer")
    frac = sum(fracs) / len(fracs)
    if not 0 < frac <= 1:
        raise ValueError(f"{f}: the mean k / in is {frac}, expected a fraction in (0, 1]")
    return frac


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}={v!r}, expected an integer >= 1")
    return v


def rank_k(rank_frac: float, d_in: int) -> int:
    """The subspace rank the plan assumes for a linear with `d_in` inputs."""
    return min(d_in, max(1, round(rank_frac * d_in)))


def shard_numel(shape, n: int) -> int:
    """Elements rank 0 holds when a tensor is split by rows over n ranks (torch.chunk: ceil(d0 / n) rows)."""
    if len(shape) == 0:
        return 1
    return math.ceil(shape[0] / n) * math.prod(shape[1:])


def _unit(name: str) -> str:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return f"block {m.group(1)}" if m else "root"


def tensors(model: GPT, method: str = "cwac", lora_r: int | None = None,
            lora_targets=LINEARS) -> tuple[list[dict], list[str], list[str]]:
    """The tensors of `model` (a GPT, e.g. on the meta device) as it is trained: [{name, shape, unit, trainable}],
    the constrained linears and the LoRA targets."""
    targets = METHODS[method].weight
    constrained = target_names(model, TARGETS[targets]) if targets else []
    biases = {f"{n}.bias" for n in constrained}
    out = [{"name": n, "shape": tuple(p.shape), "unit": _unit(n), "trainable": lora_r is None and n not in biases}
           for n, p in model.named_parameters()]  # named_parameters lists a tied weight once
    lora = []
    if lora_r is not None:
        rx = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(map(re.escape, lora_targets)) + ")")
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and rx.fullmatch(n):
                lora.append(n)
                out.append({"name": f"{n}.lora_A", "shape": (lora_r, m.in_features), "unit": _unit(n),
                            "trainable": True})
                out.append({"name": f"{n}.lora_B", "shape": (m.out_features, lora_r), "unit": _unit(n),
                            "trainable": True})
        if not lora:
            raise ValueError(f"lora_targets={list(lora_targets)}: no linear of this model matches; expected some "
                             f"of {', '.join(LINEARS)}")
    return out, constrained, lora


# --- activations ----------------------------------------------------------------------------------------------
def layer_activation_bytes(cfg: Config, e: int, lora_r: int | None = None, lora_targets=LINEARS) -> int:
    """Bytes per token one Llama block saves for backward (the module docstring's `a`)."""
    d, i, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    q, kv = h * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    full = lora_r is None
    t = set(lora_targets) if not full else set()
    qkv_in = full or bool(t & {"q_proj", "k_proj", "v_proj"})  # the input norm's output, read by q, k, v
    mlp_in = full or bool(t & {"gate_proj", "up_proj"})
    down_in = full or "down_proj" in t
    a = 2 * (4 * d + 4)  # each norm: the float32 copy of its input and its rsqrt
    a += e * d * ((2 if full else 0) + qkv_in + mlp_in)  # normalised inputs (trained norm weights) and outputs
    a += e * (2 * q + 2 * kv) + 4 * h  # q, k after RoPE, v, SDPA's output; its log-sum-exp
    a += e * (3 + down_in) * i  # gate, act(gate), up, (their product: down_proj's input)
    if not full:
        a += e * lora_r * len(t)  # A x, the input of B, per target
    return a


def once_activation_bytes(cfg: Config, e: int, full: bool = True, head: bool = True) -> int:
    """Bytes per token saved once per forward: RoPE's cos and sin, the ids (a trained embedding), and with `head`
    the final norm (float32 input and rsqrt; normalised input when trained) and the head's input (when trained).
    full=False (LoRA: embedding, norms and head frozen): the first block's input norm needs no input gradient and
    keeps no float32 copy, - (4 d + 4)."""
    d = cfg.hidden_size
    b = 2 * e * cfg.head_dim + (8 if full else -(4 * d + 4))
    if head:
        b += 4 * d + 4 + (2 * e * d if full else 0)
    return b


# --- the plan -------------------------------------------------------------------------------------------------
def check_plan(method, dtype, rank_frac, lora_r, lora_targets, batch_size, seq_len, safety_prompts,
               safety_len) -> tuple[str, ...]:
    """`plan`'s arguments, each refused in one line when out of range; returns the LoRA targets as a tuple."""
    if method not in PLAN_METHODS:
        raise ValueError(f"method={method!r}, expected one of {', '.join(PLAN_METHODS)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}, expected one of {', '.join(DTYPE_BYTES)}")
    if isinstance(rank_frac, bool) or not isinstance(rank_frac, (int, float)) or not 0 < rank_frac <= 1:
        raise ValueError(f"rank_frac={rank_frac!r}, expected a fraction in (0, 1]")
    if lora_r is not None:
        _positive_int("lora_r", lora_r)
    lora_targets = tuple(lora_targets)
    bad = [t for t in lora_targets if t not in LINEARS]
    if bad or not lora_targets:
        raise ValueError(f"lora_targets={list(lora_targets)}, expected some of {', '.join(LINEARS)}")
    for k, v in (("batch_size", batch_size), ("seq_len", seq_len), ("safety_prompts", safety_prompts),
                 ("safety_len", safety_len)):
        _positive_int(k, v)
    return lora_targets


def plan(shape, gpus: int, *, lora_r: int | None = None, offload: bool = False, checkpointing: bool = False,
         method: str = "cwac", rank_frac: float = DEFAULT_RANK_FRAC, batch_size: int = 1, seq_len: int = 2048,
         dtype: str = "bf16-mixed", lora_targets=LINEARS, safety_prompts: int = SAFETY_PROMPTS,
         safety_len: int = SAFETY_LEN, safety_layers: int | None = None) -> dict:
    """Bytes per GPU (rank 0 of `gpus`) of a sharded fine-tune of `shape` (a preset name, a model folder or a
    Config); the module docstring says what each row counts. Returns a dict with "rows" ({key: {label, bytes,
    device ("gpu" or "cpu"), estimate}}), "gpu_bytes", "cpu_bytes" and the settings."""
    name, cfg = resolve_shape(shape)
    n = _positive_int("gpus", gpus)
    lora_targets = check_plan(method, dtype, rank_frac, lora_r, lora_targets, batch_size, seq_len, safety_prompts,
                              safety_len)
    L = cfg.num_hidden_layers
    safety_layers = max(1, L // 2) if safety_layers is None else safety_layers
    if not (isinstance(safety_layers, int) and 1 <= safety_layers <= L):
        raise ValueError(f"safety_layers={safety_layers!r}, expected an integer in 1..{L}")
    e = DTYPE_BYTES[dtype]

    model = GPT(cfg, device="meta")
    ts, constrained, _ = tensors(model, method, lora_r, lora_targets)
    shards = {t["name"]: shard_numel(t["shape"], n) for t in ts}
    trained = [t for t in ts if t["trainable"]]
    units: dict[str, list[dict]] = {}
    for t in ts:
        units.setdefault(t["unit"], []).append(t)
    numel = {u: sum(math.prod(t["shape"]) for t in v) for u, v in units.items()}
    numel_tr = {u: sum(math.prod(t["shape"]) for t in v if t["trainable"]) for u, v in units.items()}
    blocks = sorted((numel[u] for u in units if u != "root"), reverse=True)

    b = {}
    b["weights"] = 4 * sum(shards.values())
    b["compute"] = e * (sum(blocks[:2]) + numel.get("root", 0))
    b["grads"] = 4 * sum(shards[t["name"]] for t in trained)
    b["grad_buffers"] = e * numel_tr.get("root", 0) + (e + 4) * max(
        (numel_tr[u] for u in units if u != "root"), default=0)
    b["adam"] = 8 * sum(shards[t["name"]] for t in trained) + 4 * len(trained)
    modules = dict(model.named_modules())
    ranks = {c: (rank_k(rank_frac, modules[c].in_features), modules[c].in_features) for c in constrained}
    # S whole on every rank, W0S by rows; with LoRA too: the kit's subspace is held as it is (A S = 0 needs S only)
    b["subspace"] = sum(4 * d_in * k + 4 * math.ceil(modules[c].out_features / n) * k
                        for c, (k, d_in) in ranks.items())
    a = layer_activation_bytes(cfg, e, lora_r, lora_targets)
    per_tok = (L * e * cfg.hidden_size + a) if checkpointing else L * a
    tokens = batch_size * seq_len
    b["activations"] = tokens * (per_tok + once_activation_bytes(cfg, e, full=lora_r is None))
    b["logits"] = 3 * 4 * tokens * cfg.vocab_size
    s_tokens = math.ceil(safety_prompts / n) * safety_len if METHODS[method].activation else 0
    s_per_tok = (safety_layers * e * cfg.hidden_size + a) if checkpointing else safety_layers * a
    b["safety"] = s_tokens * (s_per_tok + once_activation_bytes(cfg, e, full=lora_r is None, head=False))

    rows = {k: {"label": label, "bytes": b[k], "device": "cpu" if offload and cpu else "gpu",
                "estimate": k in ("grad_buffers", "activations", "safety")}
            for k, label, cpu in ROWS}
    base = [t for t in ts if not t["name"].endswith((".lora_A", ".lora_B"))]
    return {
        "shape": name, "gpus": n, "method": method, "lora_r": lora_r,
        "lora_targets": list(lora_targets) if lora_r is not None else None, "offload": offload,
        "checkpointing": checkpointing, "dtype": dtype, "rank_frac": rank_frac, "batch_size": batch_size,
        "seq_len": seq_len, "safety": {"prompts": safety_prompts, "len": safety_len, "layers": safety_layers,
                                       "tokens_per_gpu": s_tokens},
        "config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                 "head_dim", "tie_word_embeddings", "model_type")},
        "params": sum(math.prod(t["shape"]) for t in base),
        "trainable": sum(math.prod(t["shape"]) for t in trained),
        "lora_params": sum(math.prod(t["shape"]) for t in ts) - sum(math.prod(t["shape"]) for t in base),
        "targets": ranks, "activation_per_token_layer": a,
        "rows": rows,
        "gpu_bytes": sum(r["bytes"] for r in rows.values() if r["device"] == "gpu"),
        "cpu_bytes": sum(r["bytes"] for r in rows.values() if r["device"] == "cpu"),
    }


def fits(res: dict, gpu_mem_gb: float) -> tuple[bool, float]:
    """(fits, headroom in bytes) on a card of `gpu_mem_gb` GB: the usable 95% minus the GPU total (negative: short)."""
    room = (1 - RESERVE) * gpu_mem_gb * GB - res["gpu_bytes"]
    return room >= 0, room


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def _check_mems(gpu_mems) -> tuple[float, ...]:
    mems = tuple(gpu_mems)
    for m in mems:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < math.inf:
            raise ValueError(f"gpu memory {m!r} GB, expected a number > 0")
    if not mems:
        raise ValueError("no GPU memory size given, expected one or more sizes in GB")
    return mems


def _mem(m: float) -> str:
    return f"{m:g} GB"


def describe(res: dict) -> str:
    """One line: method, fine-tuning, dtype, offload, checkpointing."""
    ft = f"LoRA r={res['lora_r']}" if res["lora_r"] is not None else "full fine-tuning"
    return (f"{res['method']}, {ft}, {res['dtype']}, {'offload' if res['offload'] else 'no offload'}, "
            f"{'checkpointing' if res['checkpointing'] else 'no checkpointing'}")


def format_plan(res: dict, gpu_mems=DEFAULT_GPU_MEMS) -> str:
    """The plan as markdown: the settings, one row per category (GB per GPU, and CPU GB per rank when offloading),
    the total, and whether it fits each card size."""
    mems = _check_mems(gpu_mems)
    c = res["config"]
    n = res["gpus"]
    lines = [f"## Memory plan: {res['shape']} on {n} GPU{'s' if n > 1 else ''}", "",
             (f"- shape: {res['params'] / 1e9:.2f} B parameters ({c['model_type']}: vocab {c['vocab_size']}, hidden "
              f"{c['hidden_size']}, intermediate {c['intermediate_size']}, {c['num_hidden_layers']} layers, "
              f"{c['num_attention_heads']} heads, {c['num_key_value_heads']} kv heads, "
              f"{'tied' if c['tie_word_embeddings'] else 'untied'} head)"),
             f"- {describe(res)}"]
    if res["lora_r"] is not None:
        lines.append(f"- LoRA on {', '.join(res['lora_targets'])}: {res['lora_params'] / 1e6:.1f} M trained "
                     "parameters; the base weights are frozen")
    if res["targets"]:
        ks = [k / d for k, d in res["targets"].values()]
        lines.append(f"- weight constraint on {len(ks)} linears, k = round({res['rank_frac']:.3g} x in)"
                     + (" (on the A of each adapted target: A S = 0)" if res["lora_r"] is not None else ""))
    s = res["safety"]
    if s["tokens_per_gpu"]:
        lines.append(f"- L_safety: {s['prompts']} prompts x {s['len']} tokens (split over the ranks: "
                     f"{s['tokens_per_gpu']} tokens per GPU) through {s['layers']} blocks")
    lines.append(f"- batch: {res['batch_size']} x {res['seq_len']} tokens per GPU")
    lines.append("")
    off = res["offload"]
    lines.append("| what | GB per GPU |" + (" CPU GB per rank |" if off else ""))
    lines.append("|---|---|" + ("---|" if off else ""))
    for r in res["rows"].values():
        g = _gb(r["bytes"]) if r["device"] == "gpu" else ""
        lines.append(f"| {r['label']} | {g} |" + (f" {_gb(r['bytes']) if r['device'] == 'cpu' else ''} |"
                                                  if off else ""))
    lines.append(f"| **total** | **{_gb(res['gpu_bytes'])}** |" + (f" **{_gb(res['cpu_bytes'])}** |" if off else ""))
    lines.append("")
    lines.append(f"GB = 1e9 bytes. A card fits the run when the GPU total is at most {1 - RESERVE:.0%} of its memory "
                 f"(a {RESERVE:.0%} reserve for the allocator and the CUDA context). The rows marked estimate are "
                 "estimates; the others are counted exactly from the shapes.")
    lines.append("")
    for m in mems:
        ok, room = fits(res, m)
        use = (1 - RESERVE) * m * GB
        lines.append(f"- {_mem(m)} GPU: " + (f"fits ({_gb(room)} GB to spare of {_gb(use)} GB usable)" if ok else
                                            f"does not fit ({_gb(-room)} GB over the {_gb(use)} GB usable)"))
    return "\n".join(lines) + "\n"


def plan_table(configs, gpu_mems=DEFAULT_GPU_MEMS) -> str:
    """A markdown table, one row per configuration (a dict of `plan` keyword arguments, with shape and gpus):
    GB per GPU (and CPU GB per rank when a configuration offloads) and, per card size, whether it fits with the
    headroom: "fits (+x)" with x GB to spare, "no (-x)" x GB short."""
    mems = _check_mems(gpu_mems)
    results = []
    for kw in configs:
        kw = dict(kw)
        results.append(plan(kw.pop("shape"), kw.pop("gpus"), **kw))
    cpu = any(r["offload"] for r in results)
    head = ("| shape | GPUs | method | fine-tuning | checkpointing | offload | GB per GPU |"
            + (" CPU GB per rank |" if cpu else "") + "".join(f" {_mem(m)} |" for m in mems))
    lines = [head, "|---" * (7 + cpu + len(mems)) + "|"]
    for res in results:
        ft = f"LoRA r={res['lora_r']}" if res["lora_r"] is not None else "full"
        row = (f"| {res['shape']} | {res['gpus']} | {res['method']} | {ft} | {'yes' if res['checkpointing'] else 'no'}"
               f" | {'yes' if res['offload'] else 'no'} | {_gb(res['gpu_bytes'])} |")
        if cpu:
            row += f" {_gb(res['cpu_bytes'])} |"
        for m in mems:
            ok, room = fits(res, m)
            row += f" fits (+{_gb(room)}) |" if ok else f" no ({_gb(room)}) |"
        lines.append(row)
    return "\n".join(lines) + "\n"


# The tables in docs/performance.md: bf16-mixed, 1 x 2048 tokens per GPU, rank_frac 0.5
DOC_METHODS = ({"method": "cwac"}, {"method": "cwac-all"}, {"method": "cwac", "lora_r": 16})
DOC_CONFIGS = [dict(shape=s, gpus=g, **m) for s in ("llama-8b", "llama-70b") for m in DOC_METHODS for g in (1, 8)]
DOC_OFFLOAD_CONFIGS = [dict(shape=s, gpus=g, offload=True, checkpointing=ck, **m)
                       for s, g in (("llama-8b", 1), ("llama-70b", 8)) for m in DOC_METHODS for ck in (False, True)]


def doc_tables() -> tuple[str, str]:
    """The two tables in docs/performance.md: without offload (no checkpointing), and with offload."""
    return plan_table(DOC_CONFIGS), plan_table(DOC_OFFLOAD_CONFIGS)


# --- command line ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m minicwac plan` (values are checked by `run`)."""
    parser.add_argument("--shape", required=True,
                        help=f"a preset ({', '.join(PRESET_NAMES)}) or a model folder with config.json")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs (FSDP2 ranks) the model is sharded over")
    parser.add_argument("--lora-r", type=int, default=None, help="LoRA of this rank on every linear of every block")
    parser.add_argument("--offload", action="store_true",
                        help="weight shards, gradients, AdamW states and the subspace in CPU memory")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of every block")
    parser.add_argument("--method", default="cwac", help=f"one of {', '.join(PLAN_METHODS)} (default cwac)")
    frac = parser.add_mutually_exclusive_group()
    frac.add_argument("--rank-frac", type=float, default=None,
                      help=f"subspace rank k as a share of each layer's inputs (default {DEFAULT_RANK_FRAC})")
    frac.add_argument("--kit", default=None, help="take the mean k / in from this kit folder's kit.json")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per GPU (default 1)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--dtype", default="bf16-mixed", help="bf16-mixed (default) or fp32")
    parser.add_argument("--gpu-mem", type=float, nargs="+", default=None, metavar="GB",
                        help="card sizes to check, in GB of 1e9 bytes (default: "
                             + " ".join(map(str, DEFAULT_GPU_MEMS)) + ")")


def run(args: argparse.Namespace) -> None:
    """`python -m minicwac plan`: prints the plan (`plan_text`)."""
    print(plan_text(args))


def plan_text(args: argparse.Namespace) -> str:
    """The plan for parsed arguments, as markdown. Bad values raise ValueError with a one-line message."""
    kit, rank_frac = getattr(args, "kit", None), getattr(args, "rank_frac", None)
    if kit is not None and rank_frac is not None:
        raise ValueError("give --rank-frac or --kit, not both")
    if kit is not None:
        rank_frac = kit_rank_frac(kit)
    res = plan(args.shape, args.gpus, lora_r=getattr(args, "lora_r", None), offload=getattr(args, "offload", False),
               checkpointing=getattr(args, "checkpointing", False), method=getattr(args, "method", "cwac"),
               rank_frac=DEFAULT_RANK_FRAC if rank_frac is None else rank_frac,
               batch_size=getattr(args, "batch_size", 1), seq_len=getattr(args, "seq_len", 2048),
               dtype=getattr(args, "dtype", "bf16-mixed"))
    mems = getattr(args, "gpu_mem", None)
    return format_plan(res, DEFAULT_GPU_MEMS if not mems else mems)
