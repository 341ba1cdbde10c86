"""`python -m minicwac merge`: one results folder from several `experiment` folders with the same settings (parts
of a long grid run side by side as separate processes), or from several `real` folders that differ only in their
seeds (one seed per process)."""
from __future__ import annotations

import json
from pathlib import Path

from ..core.files import prepare_out
from ..tools.report import run_name, write_results


RESULTS_KEYS = {"settings": dict, "rows": list, "curves": dict, "safety": dict, "wall_s": (int, float)}
ROW_KEYS = ("stage", "method", "task", "p", "seed")
REAL_PARTS = ("data", "leak", "samples", "losses", "auto")  # what a `real` folder adds, keyed by seed or run


def _same(settings: dict) -> dict:
    """What must agree for two folders to merge: every setting but a `real` run's seeds (its rows name theirs)."""
    return {k: v for k, v in settings.items() if not (k == "seeds" and "preset" in settings)}


def _read_results(path: Path) -> dict:
    """An experiment's results.json, checked for what `merge_results` reads; every error names the file."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}); expected a results.json written by "
                         "experiment") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds {type(d).__name__}, expected the object experiment writes")
    for k, kind in RESULTS_KEYS.items():
        if not isinstance(d.get(k), kind):
            raise ValueError(f"{path}: {k!r} is missing or not a {getattr(kind, '__name__', 'number')}; expected "
                             "a results.json written by experiment")
    for i, r in enumerate(d["rows"]):
        if not isinstance(r, dict) or any(k not in r for k in ROW_KEYS):
            raise ValueError(f"{path}: row {i} lacks one of {', '.join(ROW_KEYS)}")
    return d


def merge_results(srcs: list[str | Path], out: str | Path) -> dict:
    """One results folder from several `experiment` folders with the same settings (e.g. methods or seeds run in
    parallel processes): rows, drift curves and per-seed safety reports are joined, results.json, results.md and
    the plots written to `out`. Models stay where they are. A run found twice must have the same result."""
    if not srcs:
        raise ValueError("nothing to merge; expected one or more folders written by experiment")
    datas = []
    for src in srcs:
        path = Path(src) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; expected a folder written by experiment")
        datas.append(_read_results(path))
        if _same(datas[-1]["settings"]) != _same(datas[0]["settings"]):
            raise ValueError(f"{src} holds results of other settings than {srcs[0]}; only runs with the same "
                             "settings can be merged")
    settings, real = dict(datas[0]["settings"]), "preset" in datas[0]["settings"]  # `real` folders name a preset
    if real:  # the seeds of them all
        settings["seeds"] = sorted({s for d in datas for s in d["settings"].get("seeds", [])})
    merged = {"settings": settings, "rows": [], "curves": {}, "safety": {},
              "wall_s": round(sum(d["wall_s"] for d in datas), 1), "parts": len(datas)}
    seen = {}
    for src, d in zip(srcs, datas):
        for x in d["rows"]:
            key = (x["stage"], x["method"], x["task"], x["p"], x["seed"])
            if key not in seen:
                seen[key] = x
                merged["rows"].append(x)
            elif x["stage"] == "finetuned" and x != seen[key]:  # the aligned model's row is re-measured per part
                raise ValueError(f"{src} has another result for the run {run_name(*key[1:])}")
        merged["curves"].update(d["curves"])
        merged["safety"].update(d["safety"])
        for k in REAL_PARTS:
            if isinstance(d.get(k), dict):
                merged.setdefault(k, {}).update(d[k])
    out = prepare_out(out)
    if real:  # a real checkpoint's report: its data, SAE and invariant per seed too
        from ..tools.real import write_real
        write_real(out, merged)
    else:
        write_results(out, merged)
    return merged


def add_arguments(p) -> None:
    p.add_argument("srcs", nargs="+", metavar="DIR", help="folders written by experiment (or by real)")
    p.add_argument("--out", required=True, help="output folder for results.json, results.md and the plots")


def run(args) -> None:
    merge_results(args.srcs, args.out)
    print(open(f"{args.out}/results.md").read())
    print(f"wrote {args.out}/results.json, results.md and the plots")
