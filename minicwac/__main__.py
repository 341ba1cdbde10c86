"""Command line: `python -m minicwac demo|eval ...`. Errors are printed as one line naming what is wrong."""
from __future__ import annotations

import argparse
import sys

from .world import TASKS


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

    e = sub.add_parser("eval", help="evaluate a model folder on the toy world (HS, compliance, FA, over-refusal)")
    e.add_argument("--model", required=True, help="a Hugging Face folder written by minicwac")
    e.add_argument("--task", default="sentiment", choices=TASKS)
    e.add_argument("--seed", type=int, default=0, help="seed of the toy world")

    args = ap.parse_args(argv)
    try:
        if args.cmd == "demo":
            from .experiments import results_table, run_demo
            rows = run_demo(args.out, args.seed, args.task, args.p, cache_dir=args.cache, progress=not args.quiet)
            print(results_table(rows))
            print(f"wrote {args.out}/results.json, results.md, pipeline.png and models/")
        elif args.cmd == "eval":
            from .evals import evaluate
            from .hf import load_checkpoint
            from .world import build_world
            model, tok = load_checkpoint(args.model)
            res = evaluate(model, tok, build_world(args.seed), args.task)
            for k in ("hs", "comply", "fa", "over_refusal", "refusal_score"):
                print(f"{k:14s} {res[k]:.2f}")
    except (ValueError, OSError) as ex:  # FileNotFoundError is an OSError
        raise SystemExit(f"minicwac: error: {ex}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
