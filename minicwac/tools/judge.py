"""`python -m minicwac judge-check`: our refusal and compliance judges (`core.evals`), and with --judge a user's,
against answers people labelled (PyRIT's refusal set, `fetch refusal-labels`)."""
from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    from ..cli import add_judge_flag
    p.add_argument("--labels", default=None,
                   help="a folder written by `fetch refusal-labels` (default: fetched once into the cache)")
    p.add_argument("--json", default=None, help="also write the figures and the misjudged rows to this file")
    add_judge_flag(p, "its harmful verdicts, scored against 'not a refusal' beside ours")


def run(args) -> None:
    from ..core.evals import judge_check
    from ..core.files import write_json_atomic
    from ..io.fetch import fetch_labels
    from ..io.prompts import load_labels
    from .report import judge_report
    path = args.labels if args.labels is not None else fetch_labels("refusal-labels", log=print).path
    rows = load_labels(path)
    res = judge_check(rows, args.judge)
    print(f"# Our judges on {path} ({len(rows)} answers labelled by people)\n")
    print(judge_report(res, rows))
    if args.json:
        write_json_atomic(Path(args.json), {"labels": str(path), **res})
        print(f"wrote {args.json}")
