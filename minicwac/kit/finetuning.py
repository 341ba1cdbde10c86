"""Fine-tune your model with a kit's constraints: resumable checkpoints, sharded runs, LoRA, a drift curve."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.cwac import finetune_cwac
from ..core.data import Seq
from ..core.evals import harmful_score
from ..core.files import atomic_folder, write_json_atomic
from ..core.hooks import model_device
from ..core.lora import LoRASettings, add_lora, lora_modules, merge_lora, save_adapter
from ..core.settings import method as method_row
from ..tools.report import figure
from .calibration import Kit

DTYPES = {"fp32": None, "bf16-mixed": torch.bfloat16}  # the autocast dtype over float32 weights


def _save_state(path: Path, model, opt, step: int, hist: dict, run: dict) -> None:
    """A resumable checkpoint folder: parameters, AdamW state, step and history, written atomically."""
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for i, st in sd["state"].items() for k, v in st.items()}
    with atomic_folder(path) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()},
                  str(tmp / "params.safetensors"))
        save_file(tensors or {"empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "history": hist, "run": run,
                                                    "param_groups": sd["param_groups"]}))


def _check_run(path: Path, run: dict) -> dict:
    """The checkpoint's state.json, refused if it was written by a run with other settings."""
    meta = json.loads((path / "state.json").read_text())
    if meta["run"] != run:
        diff = next(k for k in set(run) | set(meta["run"]) if run.get(k) != meta["run"].get(k))
        raise ValueError(f"{path} is a checkpoint of another run ({diff}: {meta['run'].get(diff)!r} there, "
                         f"{run.get(diff)!r} now); use the same flags to resume, or another --out")
    return meta


def _load_state(path: Path, model, run: dict) -> dict:
    meta = _check_run(path, run)
    params = load_file(str(path / "params.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n].to(p.device, p.dtype))
    t = load_file(str(path / "optimizer.safetensors"))
    state: dict = {}
    for k, v in t.items():
        if k == "empty":
            continue
        _, i, name = k.split(".", 2)
        state.setdefault(int(i), {})[name] = v.to(model_device(model)) if name != "step" else v
    return {"step": meta["step"], "history": meta["history"],
            "optimizer": {"state": state, "param_groups": meta["param_groups"]}}


def _move_into(src: Path, out: Path) -> None:
    """Move the files of folder `src` into `out`, each by one rename (a file of the same name is replaced). The
    weights go last: a folder that has them has everything else of the same save too."""
    for f in sorted(src.iterdir(), key=lambda f: f.suffix == ".safetensors"):
        os.replace(f, out / f.name)
    src.rmdir()


def finetune(model, tok, seqs: list[Seq], kit: Kit | None, out: str | Path, *, method: str = "cwac",
             steps: int | None = None, epochs: float | None = None, lr: float = 2e-5, batch_size: int = 8,
             lam: float | None = None, dtype: str = "fp32", eval_harmful: list[str] | None = None,
             eval_every: int = 0, eval_tokens: int = 32, save_every: int = 0, resume: bool = False, seed: int = 0,
             progress: bool = True, ranks=None, offload: bool = False, lora: LoRASettings | None = None,
             adapter: bool = False, base_model: str | None = None, checkpointing: bool = False) -> dict:
    """Fine-tune `model` on `seqs` with `method` and the kit's constraints; write OUT as a Hugging Face folder
    (model + tokenizer), OUT/history.json and, with eval prompts, OUT/drift.png (HS against step).

    save_every N: a resumable checkpoint (OUT/checkpoint) every N steps; resume=True continues from it and ends
    with the same weights as an uninterrupted run. dtype "bf16-mixed": float32 weights, bf16 autocast.
    ranks (`dist.init()` in a torchrun process): the model is sharded with FSDP2 (`dist.shard_model`, offload:
    weights, gradients and AdamW states in CPU memory), each rank trains on its part of every global batch, the
    checkpoint is sharded (`dist.save_sharded`) and rank 0 writes the folder.
    lora: train LoRA adapters only (`core.lora`), the weight constraint made exact on them (A S = 0); OUT is the
    merged model, or with adapter=True a PEFT adapter folder (adapter_config.json, adapter_model.safetensors; its
    base_model_name_or_path is `base_model`) and the tokenizer; `model` itself is left merged (or, with
    adapter=True, with its adapters). checkpointing: recompute each block's activations
    in the backward pass (memory that no longer grows with depth, about a third more compute)."""
    method_row(method, "kit")  # a method the kit offers, or a ValueError naming them
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}, expected one of {', '.join(DTYPES)}")
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if not seqs:
        raise ValueError("no training sequences")
    if steps is None:
        if not epochs > 0:
            raise ValueError(f"epochs={epochs}, expected > 0")
        steps = max(1, math.ceil(epochs * max(1, len(seqs) // batch_size)))
    if method != "sft" and kit is None:
        raise ValueError(f"method {method} needs a kit (python -m minicwac calibrate ...)")
    if ranks is not None and eval_harmful:
        raise ValueError("the drift curve (--eval-harmful) is not supported in a sharded run; run eval on the "
                         "written folder")
    if offload and ranks is None:
        raise ValueError("offload applies to a sharded run (started by torchrun)")
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError(f"the model's weights are {next(model.parameters()).dtype}; load them in float32 (bf16 "
                         "weights cannot hold the projected values: use dtype='bf16-mixed' for bf16 compute)")
    if adapter and lora is None:
        raise ValueError("an adapter folder needs LoRA (--lora-r)")
    sub, feats = kit.constraint(method) if kit is not None else (None, None)
    if lora is not None:
        lora.check()
        if adapter and model.config.model_type == "gpt2":
            raise ValueError("a GPT-2 adapter cannot be written in PEFT's layout (GPT-2 fuses q, k, v): save merged")
    lam = (kit.settings.lam if kit is not None else 0.0) if lam is None else lam
    out = Path(out)
    ckpt = out / "checkpoint"
    if not resume and out.exists() and any(out.iterdir()):  # never write over files we did not make
        what = "a fine-tuning run; pass --resume to continue it" if ckpt.exists() else "files"
        raise FileExistsError(f"{out} already holds {what}; choose another --out (or --resume a run that has "
                              "a checkpoint)")
    if resume and not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt} not found: nothing to resume (run without --resume, with --save-every N)")
    main = ranks is None or ranks.main
    if ranks is not None:
        from ..io import dist
        dist.barrier()  # every rank has checked OUT before rank 0 writes into it
    if main:
        out.mkdir(parents=True, exist_ok=True)
    run = {"method": method, "steps": steps, "lr": lr, "batch_size": batch_size, "lam": lam, "dtype": dtype,
           "seed": seed, "data_sha256": hashlib.sha256(json.dumps(seqs).encode()).hexdigest()[:16],
           "kit": None if kit is None else kit.fingerprint, "lora": None if lora is None else asdict(lora)}
    if lora is not None and not lora_modules(model):  # (`dist.load_pretrained` adds them before it shards)
        add_lora(model, lora, seed)
    model.gradient_checkpointing = checkpointing
    state, extra = None, {}
    if ranks is None:
        state = _load_state(ckpt, model, run) if resume else None
        save_state = lambda step, m, opt, hist: _save_state(ckpt, m, opt, step, hist, run)  # noqa: E731
    else:  # FSDP2: shard the model and the constraint; every rank writes its shards of the checkpoint
        if not dist.is_sharded(model):
            dist.shard_model(model, ranks, dtype, offload)
        sub = sub.shard(model) if sub is not None else None
        feats = feats.to(ranks.device) if feats is not None else None
        if resume:
            meta = _check_run(ckpt, run)
            state = {"step": meta["step"], "history": meta["history"],
                     "optimizer": lambda opt: dist.load_sharded(ckpt, model, opt)}
        save_state = lambda step, m, opt, hist: dist.save_sharded(  # noqa: E731
            ckpt, m, opt, ranks, {"step": step, "history": hist, "run": run})
        extra = {"rank": ranks.rank, "world": ranks.world, "device": ranks.device}

    def hs_curve(m):
        return harmful_score(m, tok, eval_harmful, eval_tokens)

    def on_step(step, m, opt, hist):
        if save_every and step % save_every == 0 and step < steps:
            save_state(step, m, opt, hist)

    hist = finetune_cwac(model, seqs, steps=steps, batch_size=batch_size, lr=lr, pad_id=tok.pad_token_id,
                         subspace=sub, features=feats, lam=lam, seed=seed,
                         autocast_dtype=DTYPES[dtype] if ranks is None else None,  # FSDP2 casts by its own policy
                         eval_every=eval_every if eval_harmful else None, eval_fn=hs_curve if eval_harmful else None,
                         resume=state, on_step=on_step, desc=method, progress=progress and main, **extra)
    leak = None if sub is None else sub.mismatch(model)  # the invariant on the written weights: W S = W0 S
    if ranks is not None:  # the largest over every rank's shards; then the whole model, gathered to rank 0
        leak = None if sub is None else dist.max_over_ranks(leak)
        full = dist.full_state(model)
        model = dist.unsharded(model, full, lora) if main else None
    result = {"run": run, "history": hist, "relative_WS_error": leak}
    if main:
        from ..io.hf import save_pretrained  # minicwac's own model class writes Hugging Face folders
        if adapter:
            save_adapter(model, out / ".model.tmp", lora, base_model=base_model)
            tok.save(out / ".model.tmp")
        else:
            save_pretrained(merge_lora(model) if lora is not None else model, tok, out / ".model.tmp")
        _move_into(out / ".model.tmp", out)
        write_json_atomic(out / "history.json", {**result, "ranks": 1 if ranks is None else ranks.world})
        if hist.get("curve"):
            plot_drift(hist["curve"], out / "drift.png", method)
        if ckpt.exists():
            shutil.rmtree(ckpt)  # the run is complete: its resumable checkpoint (written by us) is no longer needed
    if ranks is not None:
        dist.barrier()
    return result


def plot_drift(curve: list[dict], path: Path, label: str) -> None:

    fig, ax = figure(figsize=(5, 3.5))
    ax.plot([c["step"] for c in curve], [c["hs"] for c in curve], "o-", label=label)
    ax.set(xlabel="fine-tuning step", ylabel="HS % (lower is better)", ylim=(-2, 102), title="Safety drift")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------- python -m minicwac finetune


def add_arguments(p) -> None:
    from ..cli import nonnegative, positive_float, positive_int
    from ..core.lora import LINEARS
    from ..core.settings import methods_for
    p.add_argument("--model", required=True, help="the aligned model (a Hugging Face folder)")
    p.add_argument("--data", required=True, help='JSONL: {"messages": [...]} or {"prompt": ..., "completion": ...}')
    p.add_argument("--kit", default=None, help="the kit folder from calibrate (not needed for sft)")
    p.add_argument("--method", default="cwac", choices=methods_for("kit"))
    p.add_argument("--out", required=True, help="output: a Hugging Face folder, history.json, drift.png")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (or --epochs)")
    p.add_argument("--epochs", type=positive_float, default=None, help="passes over the data (default 1)")
    p.add_argument("--lr", type=positive_float, default=2e-5, help="peak learning rate (default 2e-5)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-len", type=positive_int, default=512)
    p.add_argument("--too-long", default="truncate", choices=["truncate", "refuse"],
                   help="a conversation over --max-len tokens is cut (default, counted) or refused")
    p.add_argument("--lam", type=nonnegative, default=None, help="weight of L_safety (default: the kit's)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="bf16-mixed: float32 weights with bf16 compute (the constraint stays exact)")
    p.add_argument("--device", default="cpu", help="cpu or cuda; under torchrun each process takes cuda:LOCAL_RANK")
    p.add_argument("--lora-r", type=positive_int, default=None,
                   help="train LoRA adapters of this rank only (the weight constraint exact on them)")
    p.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA scale alpha / r (default alpha 2r)")
    p.add_argument("--lora-targets", nargs="+", default=None, choices=LINEARS, metavar="NAME",
                   help=f"block linears that get adapters (default all: {' '.join(LINEARS)})")
    p.add_argument("--save-adapter", action="store_true",
                   help="with --lora-r: write a PEFT adapter folder instead of the merged model")
    p.add_argument("--checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory, ~1/3 more compute)")
    p.add_argument("--offload", action="store_true",
                   help="under torchrun: keep the weight shards, gradients and AdamW states in CPU memory")
    p.add_argument("--eval-harmful", default=None, help="harmful prompts for the drift curve (HS against step)")
    p.add_argument("--eval-every", type=positive_int, default=None, help="steps between drift points")
    p.add_argument("--save-every", type=positive_int, default=None, help="a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> None:
    from ..core.lora import LINEARS, LoRASettings
    from ..io import dist
    from ..io.hf import load_checkpoint, load_tokenizer
    from ..io.prompts import load_prompts
    from .data import encode_data, load_conversations
    if args.steps is not None and args.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if args.method != "sft" and args.kit is None:
        raise ValueError(f"--method {args.method} needs --kit (a folder written by calibrate)")
    if (args.eval_every is None) != (args.eval_harmful is None):
        raise ValueError("--eval-harmful and --eval-every go together")
    if args.lora_r is None and (args.lora_alpha is not None or args.lora_targets or args.save_adapter):
        raise ValueError("--lora-alpha, --lora-targets and --save-adapter need --lora-r")
    lora = None if args.lora_r is None else LoRASettings(args.lora_r, args.lora_alpha,
                                                         tuple(args.lora_targets or LINEARS)).check()
    ranks = dist.init(args.device) if dist.launched() else None  # torchrun: FSDP2 over its processes
    say = print if ranks is None or ranks.main else (lambda *a, **k: None)
    convs = load_conversations(args.data)
    eval_harmful = load_prompts(args.eval_harmful) if args.eval_harmful else None
    if ranks is None:  # the projection needs float32 weights
        model, tok = load_checkpoint(args.model, args.device, torch.float32)
    else:  # sharded as it is read: each rank reads its own rows (+ LoRA adapters, drawn the same on every rank)
        model = dist.load_pretrained(args.model, ranks, args.dtype, args.offload, lora, args.seed)
        tok = load_tokenizer(args.model)
    kit = Kit.load(args.kit, model) if args.kit else None
    seqs, cut = encode_data(tok, convs, args.max_len, args.too_long)
    if cut:
        say(f"{cut} of {len(seqs)} conversations were longer than --max-len {args.max_len} and were cut")
    epochs = 1.0 if args.steps is None and args.epochs is None else args.epochs
    try:
        res = finetune(model, tok, seqs, kit, args.out, method=args.method, steps=args.steps, epochs=epochs,
                       lr=args.lr, batch_size=args.batch_size, lam=args.lam, dtype=args.dtype,
                       eval_harmful=eval_harmful, eval_every=args.eval_every or 0, save_every=args.save_every or 0,
                       resume=args.resume, seed=args.seed, progress=not args.quiet, ranks=ranks, offload=args.offload,
                       lora=lora, adapter=args.save_adapter, base_model=str(args.model),
                       checkpointing=args.checkpointing)
    finally:
        if ranks is not None:
            dist.close()
    h = res["history"]
    say(f"{args.method}: {len(h['step'])} steps, task loss {h['task'][0]:.3f} -> {h['task'][-1]:.3f}"
        + (f", L_safety {h['safety'][-1]:.4f}" if any(h["safety"]) else "")
        + ("" if res["relative_WS_error"] is None else f", |W S - W0S| / |W0S| = {res['relative_WS_error']:.1e}"))
    what = "a PEFT adapter folder" if args.save_adapter else "a Hugging Face folder"
    say(f"wrote {args.out} ({what}), history.json" + (", drift.png" if h.get("curve") else "")
        + ("" if ranks is None else f"; trained on {ranks.world} ranks"))
