"""Fine-tune your model with a kit's constraints: resumable checkpoints, sharded runs, LoRA, a drift curve."""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.cwac import Constraints, Schedule, finetune_cwac
from ..core.data import Seq
from ..core.evals import harmful_score, hs_label
from ..core.files import atomic_folder, prepare_out, replace_folder, write_json_atomic
from ..core.hooks import model_device
from ..core.lora import LoRASettings, add_lora, lora_modules, merge_lora, save_adapter
from ..core.settings import cwac_method, method as method_row
from ..tools.report import figure
from .calibration import Kit

DTYPES = {"fp32": None, "bf16-mixed": torch.bfloat16}  # the autocast dtype over float32 weights


def _save_state(path: Path, model, opt, step: int, hist: dict, run: dict) -> None:
    """A resumable checkpoint folder: parameters, AdamW state, step and history, written atomically."""
    sd = opt.state_dict()  # {"state": {param index: {step, exp_avg, exp_avg_sq}}, "param_groups": [...]}
    # flattened to "state.<param index>.<name>" keys: safetensors holds one flat dict of tensors (a step that
    # is a plain number becomes a tensor)
    tensors = {f"state.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for i, st in sd["state"].items() for k, v in st.items()}
    # a sharded checkpoint this run resumed from (`resume_state`) does not have our files: written beside it, then
    # swapped in whole (`atomic_folder` would refuse to drop its shards), so OUT/checkpoint is never incomplete
    sharded = (path / "state.json").is_file() and not (path / "params.safetensors").is_file()
    target = path.with_name(f".{path.name}.new") if sharded else path
    with atomic_folder(target) as tmp:
        # every parameter by name, frozen ones too: the checkpoint alone restores the model
        save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()},
                  str(tmp / "params.safetensors"))
        # a placeholder when AdamW holds no state (`_read_state` skips it)
        save_file(tensors or {"empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
        # the param groups (lr, betas, weight decay, their parameters' indices) are small: JSON beside the tensors
        # format and world_size: what `resume_state` reads it with (a sharded checkpoint records its own)
        (tmp / "state.json").write_text(json.dumps({"step": step, "history": hist, "run": run, "format": "single",
                                                    "world_size": 1, "param_groups": sd["param_groups"]}))
    if sharded:
        replace_folder(target, path)


def _check_run(path: Path, run: dict) -> dict:
    """The checkpoint's state.json, refused if it was written by a run with other settings."""
    try:  # missing, not UTF-8, not JSON (a disk that filled up, a hand edit): one line naming the file
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise ValueError(f"{path / 'state.json'} cannot be read ({why}); the checkpoint cannot be resumed: run again "
                         "into another --out") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("run"), dict) and {"step", "history"} <= meta.keys()):
        raise ValueError(f"{path / 'state.json'} is not a checkpoint's state (run, step, history); the checkpoint "
                         "cannot be resumed: run again into another --out")
    if meta["run"] != run:  # resuming under other flags would mix two runs in one history
        # name the first setting that differs
        diff = next(k for k in set(run) | set(meta["run"]) if run.get(k) != meta["run"].get(k))
        raise ValueError(f"{path} is a checkpoint of another run ({diff}: {meta['run'].get(diff)!r} there, "
                         f"{run.get(diff)!r} now); use the same flags to resume, or another --out")
    return meta


def _read_state(path: Path) -> tuple[dict, dict]:
    """A one-process checkpoint's tensors on the CPU: the parameters by name and AdamW's state by parameter index."""
    files = {}
    for name in ("params.safetensors", "optimizer.safetensors"):
        try:  # a truncated or damaged file (a full disk while saving, a copy cut short): one line naming it
            files[name] = load_file(str(path / name))
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own error type, and OSError
            raise ValueError(f"{path / name} cannot be read ({type(e).__name__}: {e}); the checkpoint cannot be "
                             "resumed: run again into another --out") from None
    params, state = files["params.safetensors"], {}  # name -> tensor
    # back from "state.<i>.<name>" keys to AdamW's nested dict ("empty": the placeholder of a stateless AdamW)
    for k, v in files["optimizer.safetensors"].items():
        if k != "empty":
            _, i, name = k.split(".", 2)  # "state", the parameter's index, the state's name
            state.setdefault(int(i), {})[name] = v
    return params, state


def _load_state(path: Path, model, meta: dict) -> dict:
    """A one-process checkpoint into a one-process run: the weights now, the `resume` dict of `finetune_cwac`."""
    params, state = _read_state(path)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n].to(p.device, p.dtype))  # in place, on the model's device and dtype
    for st in state.values():  # the moments beside the parameters; `step` stays on the CPU, where AdamW keeps it
        st.update({k: v.to(model_device(model)) for k, v in st.items() if k != "step"})
    return {"step": meta["step"], "history": meta["history"],
            "optimizer": {"state": state, "param_groups": meta["param_groups"]}}


def resume_state(ckpt: Path, model, record: dict, proc) -> dict:
    """The `resume` dict of `finetune_cwac` for OUT/checkpoint, on 1 process or N ranks whoever wrote it: one
    process (`_save_state`: whole tensors) or N ranks (`dist.save_sharded`: torch.distributed.checkpoint's files,
    which it reshards to any number of ranks, one included). A sharded run loads once its optimizer exists."""
    meta = _check_run(ckpt, record)
    # before the format was recorded: a one-process checkpoint is the one with params.safetensors
    fmt = meta.get("format", "single" if (ckpt / "params.safetensors").is_file() else "sharded")
    if fmt not in ("single", "sharded"):
        raise ValueError(f"{ckpt / 'state.json'}: unknown checkpoint format {fmt!r}, expected single or sharded")
    if fmt == "single" and proc is None:
        return _load_state(ckpt, model, meta)
    from ..io import dist
    if fmt == "sharded":
        load = lambda opt: dist.load_sharded(ckpt, model, opt)  # noqa: E731
    else:  # every rank reads the whole tensors and keeps its rows
        load = lambda opt: dist.load_whole(model, opt, *_read_state(ckpt), meta["param_groups"])  # noqa: E731
    return {"step": meta["step"], "history": meta["history"], "optimizer": load}


def _move_into(src: Path, out: Path) -> None:
    """Move the files of folder `src` into `out`, each by one rename (a file of the same name is replaced). The
    weights go last: a folder that has them has everything else of the same save too."""
    # False sorts first: the .safetensors files come last
    for f in sorted(src.iterdir(), key=lambda f: f.suffix == ".safetensors"):
        os.replace(f, out / f.name)  # one rename per file: each is the old one or the new one, never a part
    src.rmdir()  # empty now


@dataclass
class RunOptions:
    """What happens around the training loop of `finetune`: the drift curve, checkpoints, sharding, memory, the
    output's form."""

    eval_harmful: list[str] | None = None  # harmful prompts for the drift curve (HS against step) ...
    eval_every: int = 0  # ... every this many steps
    eval_tokens: int = 32  # answer length of the drift curve's HS
    judge: object = None  # who calls the curve's answers harmful: judge(prompts, answers) (None: the refusal matcher)
    save_every: int = 0  # a resumable checkpoint (OUT/checkpoint) every this many steps (0: none)
    resume: bool = False  # continue from OUT/checkpoint: the same weights as an uninterrupted run
    proc: object = None  # `dist.init()` in a torchrun process: FSDP2 over the ranks
    offload: bool = False  # sharded runs: weights, gradients and AdamW states in CPU memory
    checkpointing: bool = False  # recompute each block's activations in backward (less memory, ~1/3 more compute)
    adapter: bool = False  # with LoRA: write a PEFT adapter folder instead of the merged model ...
    base_model: str | None = None  # ... whose base_model_name_or_path is this

    def check(self, lora: LoRASettings | None) -> "RunOptions":
        if self.proc is not None and self.eval_harmful:
            raise ValueError("the drift curve (--eval-harmful) is not supported in a sharded run; run eval on the "
                             "written folder")
        if self.offload and self.proc is None:
            raise ValueError("offload applies to a sharded run (started by torchrun)")
        if self.adapter and lora is None:
            raise ValueError("an adapter folder needs LoRA (--lora-r)")
        return self


def finetune(model, tok, seqs: list[Seq], kit: Kit | None, out: str | Path, *, method: str | None = None,
             steps: int | None = None, epochs: float | None = None, lr: float = 2e-5, batch_size: int = 8,
             seed: int = 0, lam: float | None = None, dtype: str = "fp32", lora: LoRASettings | None = None,
             run: RunOptions | None = None, progress: bool = True) -> dict:
    """Fine-tune `model` on `seqs` with `method` and the kit's constraints (lam: the kit's unless given); write OUT
    as a Hugging Face folder (model + tokenizer), OUT/history.json and, with a drift curve, OUT/drift.png.

    method: a row of `core.settings.METHODS` that a kit serves; None: CWAC on the targets the kit was made for
    (`cwac`, `cwac-all` or `cwac-auto`), as the CLI's default.

    steps, or epochs: passes over the data. dtype "bf16-mixed": float32 weights, bf16 autocast.
    lora: train LoRA adapters only (`core.lora`), the weight constraint made exact on them (A S = 0); OUT is the
    merged model (`model` itself is left merged), or with run.adapter a PEFT adapter folder and the tokenizer.
    run (`RunOptions`): save_every N writes a resumable checkpoint (OUT/checkpoint) every N steps and resume=True
    continues from it (a checkpoint of 1 process on N ranks too, and back: `resume_state`); with proc (a torchrun
    process, `dist.init()`) the model is sharded with FSDP2 (`dist.shard_model`), each rank trains on its part of
    every global batch, the checkpoint is sharded and rank 0 writes the folder."""
    run = (run or RunOptions()).check(lora)
    if method is None:  # CWAC on the kit's own targets (no kit: "cwac", refused below for want of one)
        method = cwac_method(kit.settings.targets if kit is not None else "down_proj")
    # everything checked before OUT is touched
    steps = check_finetune(model, seqs, kit, method, steps, epochs, batch_size, lr, dtype, lora, run)
    # the method's constraints from the kit (sft: none)
    sub, feats = kit.constraint(method) if kit is not None else (None, None)
    # the kit's lam unless one is given
    lam = (kit.settings.lam if kit is not None else 0.0) if lam is None else lam
    out, proc = Path(out), run.proc
    # main: the process that writes files (rank 0, or the only one)
    ckpt, main = out / "checkpoint", proc is None or proc.main
    prepare_run_folder(out, ckpt, run.resume, proc)
    # what makes a run itself: a checkpoint resumes only under the same record (`_check_run`)
    record = {"method": method, "steps": steps, "lr": lr, "batch_size": batch_size, "lam": lam, "dtype": dtype,
              "seed": seed, "data_sha256": hashlib.sha256(json.dumps(seqs).encode()).hexdigest()[:16],
              "kit": None if kit is None else kit.fingerprint, "lora": None if lora is None else asdict(lora)}
    record = json.loads(json.dumps(record))  # as state.json holds it (LoRA's target tuple a list), or never equal
    if lora is not None and not lora_modules(model):  # (`dist.load_pretrained` adds them before it shards)
        add_lora(model, lora, seed)
    model.gradient_checkpointing = run.checkpointing  # read by the model's forward
    if proc is None:
        save_state = lambda step, m, opt, hist: _save_state(ckpt, m, opt, step, hist, record)  # noqa: E731
    else:  # FSDP2: shard the model and the constraint; every rank writes its shards of the checkpoint
        from ..io import dist
        # `dist.load_pretrained` shards as it reads; a model passed whole is sharded here
        if not dist.is_sharded(model):
            dist.shard_model(model, proc, dtype, run.offload)
        sub = sub.shard(model) if sub is not None else None  # W0S split by the weights' rows, S whole on every rank
        feats = feats.to(proc.device) if feats is not None else None  # the fixed prompts and z0 on this rank's device
        if feats is not None and lam > 0 and dtype == "bf16-mixed":  # FSDP2 reads z in bf16: z0 read the same way,
            feats = feats.rebased(model)  # so that L_safety starts at 0, not at a floor of rounding noise
        save_state = lambda step, m, opt, hist: dist.save_sharded(  # noqa: E731
            ckpt, m, opt, proc, {"step": step, "history": hist, "run": record})
    # weights, AdamW state, step and history of OUT/checkpoint, written by 1 process or by any number of ranks
    state = resume_state(ckpt, model, record, proc) if run.resume else None

    # checkpoints along the way; none after the last step, where the run's output follows
    def on_step(step, m, opt, hist):
        if run.save_every and step % run.save_every == 0 and step < steps:
            save_state(step, m, opt, hist)

    curve = None
    if run.eval_harmful and run.eval_every:  # HS against step, measured in eval mode
        curve = (run.eval_every, lambda m: harmful_score(m, tok, run.eval_harmful, run.eval_tokens, run.judge))
    hist = finetune_cwac(model, seqs, Schedule(steps, batch_size, lr, seed=seed),
                         None if kit is None else Constraints(sub, feats, lam, kit.settings.safety_batch),
                         pad_id=tok.pad_token_id, autocast_dtype=DTYPES[dtype] if proc is None else None,  # FSDP2
                         curve=curve, resume=state, on_step=on_step, proc=proc, desc=method,  # casts by its policy
                         progress=progress and main)
    return write_finetuned(model, tok, out, ckpt, sub, hist, record, method, lora, run)


def check_finetune(model, seqs, kit, method, steps, epochs, batch_size, lr, dtype, lora, run) -> int:
    """The arguments of `finetune`, checked before anything is written; returns the number of steps."""
    method_row(method, "kit")  # a method the kit offers, or a ValueError naming them
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}, expected one of {', '.join(DTYPES)}")
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if not seqs:
        raise ValueError("no training sequences")
    # the numbers the schedule divides by or steps with (the CLI's flags are checked by argparse already)
    if not (isinstance(batch_size, numbers.Integral) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r}, expected an integer >= 1")
    if steps is not None and not (isinstance(steps, numbers.Integral) and steps >= 1):
        raise ValueError(f"steps={steps!r}, expected an integer >= 1")
    if not (isinstance(lr, numbers.Real) and 0 < lr < math.inf):
        raise ValueError(f"lr={lr!r}, expected a finite number > 0")
    if method != "sft" and kit is None:
        raise ValueError(f"method {method} needs a kit (python -m minicwac calibrate ...)")
    # the projection writes values W0S pins exactly: bf16 weights would round them off at every step
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError(f"the model's weights are {next(model.parameters()).dtype}; load them in float32 (bf16 "
                         "weights cannot hold the projected values: use dtype='bf16-mixed' for bf16 compute)")
    if lora is not None:
        lora.check()
        if run.adapter and model.config.model_type == "gpt2":
            raise ValueError("a GPT-2 adapter cannot be written in PEFT's layout (GPT-2 fuses q, k, v): save merged")
    if steps is None:  # epochs: an epoch is len // batch_size steps (`batches` drops the short last batch)
        if not (isinstance(epochs, numbers.Real) and 0 < epochs < math.inf):
            raise ValueError(f"epochs={epochs!r}, expected a finite number > 0")
        steps = max(1, math.ceil(epochs * max(1, len(seqs) // batch_size)))
    warn_periods(run, steps)
    return steps


def warn_periods(run: RunOptions, steps: int) -> None:
    """A period longer than the run does nothing, quietly: say so (e.g. the README's example on a small data file)."""
    if run.proc is not None and not run.proc.main:  # one warning, not one per rank
        return
    if run.eval_harmful and run.eval_every > steps:
        warnings.warn(f"--eval-every {run.eval_every} is more than the run's {steps} steps: the drift curve has only "
                      "step 0 and the last step", stacklevel=4)
    # no checkpoint at the last step either: the model folder is written there
    if run.save_every >= steps:
        warnings.warn(f"--save-every {run.save_every} is not less than the run's {steps} steps: no checkpoint will be "
                      "written", stacklevel=4)


def prepare_run_folder(out: Path, ckpt: Path, resume: bool, proc) -> None:
    """OUT must be new or empty, or (resume) hold our checkpoint: never write over files we did not make."""
    if not resume and out.exists() and any(out.iterdir()):  # OUT holding files and no resume: refused
        what = "a fine-tuning run; pass --resume to continue it" if ckpt.exists() else "files"
        raise FileExistsError(f"{out} already holds {what}; choose another --out (or --resume a run that has "
                              "a checkpoint)")
    if resume and not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt} not found: nothing to resume (run without --resume, with --save-every N)")
    if proc is not None:
        from ..io import dist
        dist.barrier()  # every rank has checked OUT before rank 0 writes into it
    if proc is None or proc.main:
        prepare_out(out)  # only one process creates it (and checks it can write there)


def write_finetuned(model, tok, out: Path, ckpt: Path, sub, hist: dict, record: dict, method: str,
                    lora: LoRASettings | None, run: RunOptions) -> dict:
    """The weight-side error on the trained weights, then (rank 0) the model folder, history.json, drift.png; the
    resumable checkpoint is removed once the run is complete."""
    proc = run.proc
    main = proc is None or proc.main
    error = None if sub is None else sub.ws_error(model)  # the invariant on the written weights: W S = W0 S
    if proc is not None:  # the largest over every rank's shards; then the whole model, gathered to rank 0
        from ..io import dist
        error = None if sub is None else dist.max_over_ranks(error)
        full = dist.full_state(model)  # every rank takes part; rank 0 gets the whole state
        # a plain copy for saving; the other ranks hold none
        model = dist.unsharded(model, full, lora) if main else None
    result = {"run": record, "history": hist, "ws_error": error}  # also returned to the caller
    if main:
        from ..io.hf import save_pretrained  # minicwac's own model class writes Hugging Face folders
        # written into a hidden folder, then moved into OUT: OUT may already hold the checkpoint, and a folder
        # written whole (`atomic_folder`) would have to replace all of OUT
        if run.adapter:
            save_adapter(model, out / ".model.tmp", lora, base_model=run.base_model)  # A and B only, in PEFT's layout
            tok.save(out / ".model.tmp")
        else:
            # LoRA: the adapters folded into W0 first (`model` is left merged)
            save_pretrained(merge_lora(model) if lora is not None else model, tok, out / ".model.tmp")
        _move_into(out / ".model.tmp", out)  # the weights last: their presence means the folder is complete
        write_json_atomic(out / "history.json", {**result, "ranks": 1 if proc is None else proc.world_size})
        if hist.get("curve"):
            plot_drift(hist["curve"], out / "drift.png", method, hs_label(hist["curve"][0]["judge"]))
        if ckpt.exists():
            shutil.rmtree(ckpt)  # the run is complete: its resumable checkpoint (written by us) is no longer needed
    if proc is not None:
        from ..io import dist
        dist.barrier()  # no rank goes on before rank 0 has written everything
    return result


def plot_drift(curve: list[dict], path: Path, label: str, hs: str = "HS") -> None:

    fig, ax = figure(figsize=(5, 3.5))  # HS % against step: one line, the method's
    ax.plot([c["step"] for c in curve], [c["hs"] for c in curve], "o-", label=label)
    ax.set(xlabel="fine-tuning step", ylabel=f"{hs} % (lower is better)", ylim=(-2, 102), title="Safety drift")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------- python -m minicwac finetune


def add_arguments(p) -> None:
    from ..cli import add_judge_flag, nonnegative, positive_float, positive_int
    from ..core.lora import LINEARS
    from ..core.settings import methods_for
    p.add_argument("--model", required=True, help="the aligned model (a Hugging Face folder)")
    p.add_argument("--data", required=True, help='JSONL: {"messages": [...]} or {"prompt": ..., "completion": ...}')
    p.add_argument("--kit", default=None, help="the kit folder from calibrate (not needed for sft)")
    # the methods a kit offers (`core.settings.METHODS`)
    p.add_argument("--method", default=None, choices=methods_for("kit"),
                   help="default: CWAC on the kit's own weight targets (cwac, cwac-all or cwac-auto, as calibrate's "
                        "--targets was)")
    p.add_argument("--out", required=True, help="output: a Hugging Face folder, history.json, drift.png")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (or --epochs)")
    p.add_argument("--epochs", type=positive_float, default=None, help="passes over the data (default 1)")
    p.add_argument("--lr", type=positive_float, default=2e-5, help="peak learning rate (default 2e-5)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-len", type=positive_int, default=512)  # tokens per conversation
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
    add_judge_flag(p, "the drift curve (--eval-harmful)")
    p.add_argument("--save-every", type=positive_int, default=None, help="a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--seed", type=int, default=0)  # the batches' order, the safety picks and LoRA's A
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> None:
    from ..core.lora import LINEARS, LoRASettings
    from ..io import dist
    from ..io.hf import check_vocab, load_checkpoint, load_tokenizer
    from ..io.prompts import load_prompts
    from .data import encode_data, load_conversations
    # flag combinations refused before the model is loaded
    if args.steps is not None and args.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if args.method != "sft" and args.kit is None:
        raise ValueError(f"--method {args.method or 'cwac (the default)'} needs --kit (a folder written by "
                         "calibrate)")
    if (args.eval_every is None) != (args.eval_harmful is None):
        raise ValueError("--eval-harmful and --eval-every go together")
    if args.judge is not None and args.eval_harmful is None:  # it would judge nothing: a silent no-op otherwise
        raise ValueError("--judge needs --eval-harmful (the drift curve is the only HS finetune measures)")
    if args.lora_r is None and (args.lora_alpha is not None or args.lora_targets or args.save_adapter):
        raise ValueError("--lora-alpha, --lora-targets and --save-adapter need --lora-r")
    lora = None if args.lora_r is None else LoRASettings(args.lora_r, args.lora_alpha,
                                                         tuple(args.lora_targets or LINEARS)).check()
    proc = dist.init(args.device) if dist.launched() else None  # torchrun: FSDP2 over its processes
    # only rank 0 prints
    say = print if proc is None or proc.main else (lambda *a, **k: None)
    convs = load_conversations(args.data)
    eval_harmful = load_prompts(args.eval_harmful) if args.eval_harmful else None
    if proc is None:  # the projection needs float32 weights
        model, tok = load_checkpoint(args.model, args.device, torch.float32)
    else:  # sharded as it is read: each rank reads its own rows (+ LoRA adapters, drawn the same on every rank)
        model = dist.load_pretrained(args.model, proc, args.dtype, args.offload, lora, args.seed)
        tok = check_vocab(model, load_tokenizer(args.model), args.model)  # as load_checkpoint does
    kit = Kit.load(args.kit, model) if args.kit else None  # refused if it was made for another model (`Kit.load`)
    seqs, cut = encode_data(tok, convs, args.max_len, args.too_long)  # cut: how many conversations were truncated
    if cut:
        say(f"{cut} of {len(seqs)} conversations were longer than --max-len {args.max_len} and were cut")
    # neither --steps nor --epochs: one pass over the data
    epochs = 1.0 if args.steps is None and args.epochs is None else args.epochs
    try:
        run = RunOptions(eval_harmful=eval_harmful, eval_every=args.eval_every or 0, judge=args.judge,
                         save_every=args.save_every or 0,
                         resume=args.resume, proc=proc, offload=args.offload, checkpointing=args.checkpointing,
                         # absolute: a path relative to the current folder would not load from anywhere else
                         adapter=args.save_adapter, base_model=str(Path(args.model).resolve()))
        res = finetune(model, tok, seqs, kit, args.out, method=args.method, steps=args.steps, epochs=epochs,
                       lr=args.lr, batch_size=args.batch_size, seed=args.seed, lam=args.lam, dtype=args.dtype,
                       lora=lora, run=run, progress=not args.quiet)
    finally:  # leave the process group, also after an error
        if proc is not None:
            dist.close()
    h = res["history"]
    say(f"{res['run']['method']}: {len(h['step'])} steps, task loss {h['task'][0]:.3f} -> {h['task'][-1]:.3f}"
        + (f", L_safety {h['safety'][-1]:.4f}" if any(h["safety"]) else "")
        + (f", {hs_label(h['curve'][0]['judge'])} {h['curve'][0]['hs']:.1f} -> {h['curve'][-1]['hs']:.1f}"
           if h.get("curve") else "")
        + ("" if res["ws_error"] is None else f", |W S - W0S| / |W0S| = {res['ws_error']:.1e}"))
    what = "a PEFT adapter folder" if args.save_adapter else "a Hugging Face folder"
    say(f"wrote {args.out} ({what}), history.json" + (", drift.png" if h.get("curve") else "")
        + ("" if proc is None else f"; trained on {proc.world_size} ranks"))
