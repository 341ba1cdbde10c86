"""`python -m minicwac eval`: HS, compliance, over-refusal and refusal score of a model folder, on your prompt
files or (without --harmful) on the toy world, with a sample of answers."""
from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    from ..cli import add_judge_flag, positive_int
    from ..toy.world import TASKS
    p.add_argument("--model", required=True, help="a Hugging Face model folder")
    p.add_argument("--harmful", default=None, help="harmful prompts (.txt/.csv/.jsonl); without it: the toy world")
    p.add_argument("--harmless", default=None, help="harmless prompts for over-refusal (with --harmful)")
    p.add_argument("--max-new-tokens", type=positive_int, default=40, help="greedy answer length (default 40)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the figures and every answer sample to this file")
    p.add_argument("--task", default="sentiment", choices=TASKS, help="toy world only: the FA task")
    p.add_argument("--seed", type=int, default=0, help="toy world only: its seed")
    add_judge_flag(p)


def run(args) -> None:
    from ..core.files import write_json_atomic
    from ..io.hf import load_checkpoint
    if args.json:  # checked before the evaluation, not after it
        check_json_target(Path(args.json))
    if args.harmful is None:
        if args.harmless is not None:
            raise ValueError("--harmless needs --harmful (without --harmful, eval uses the toy world's prompts)")
        from ..toy.evals import evaluate
        from ..toy.world import build_world
        model, tok = load_checkpoint(args.model, args.device)
        res = evaluate(model, tok, build_world(args.seed), args.task, judge=args.judge)
    else:
        from ..core.evals import evaluate_prompts
        from ..io.prompts import load_prompts
        harmful = load_prompts(args.harmful)
        harmless = load_prompts(args.harmless) if args.harmless else None
        model, tok = load_checkpoint(args.model, args.device)
        res = evaluate_prompts(model, tok, harmful, harmless, max_new_tokens=args.max_new_tokens, judge=args.judge)
    from ..core.evals import hs_label
    for k in ("hs", "comply", "fa", "over_refusal", "refusal_score"):
        if k in res:  # None: not measured (over-refusal needs --harmless); HS names the judge that made it
            name = hs_label(res["judge"]) if k == "hs" else k
            print(f"{name:22s} {'-' if res[k] is None else format(res[k], '.2f')}")
    for kind in ("harmful", "harmless"):
        for prompt, answer in res["samples"][kind]:
            print(f"{kind}: {prompt[:80]!r} -> {answer[:120]!r}")
    if args.json:
        write_json_atomic(Path(args.json), {**res, "model": str(args.model)})
        print(f"wrote {args.json}")


def check_json_target(path: Path) -> None:
    """--json names a file this command can create: not a folder, in a folder that exists."""
    if path.is_dir():
        raise ValueError(f"--json {path} is a folder; expected a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--json {path}: the folder {path.parent} does not exist")
