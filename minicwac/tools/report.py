"""Results of any experiment (toy world or real checkpoint): rows, markdown tables, drift tables and plots.

Every result is a row of results.json:
{"stage": "base|aligned|finetuned", "method": "none|sft|...", "task": ..., "p": ..., "seed": ..., "hs": ...,
 "comply": ..., "fa": ..., "over_refusal": ..., "refusal_score": ..., "n_harmful": ...}
with hs, comply, fa and over_refusal in percent.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..core.files import write_json_atomic
from ..core.evals import hs_label


def figure(nrows: int = 1, ncols: int = 1, figsize=None, **kw):
    """(figure, axes) made outside pyplot: no backend is switched and nothing stays open, so a notebook that
    calls the package keeps its inline plots."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


# a row of results.json; "judge": who called the answers harmful (HS is that judge's figure)
ROW_KEYS = ("stage", "method", "task", "p", "seed", "hs", "comply", "fa", "over_refusal", "refusal_score",
            "n_harmful", "judge")
TABLE_KEYS = ROW_KEYS[:10]  # the columns of `results_table`, as its header names them


def row(stage: str, method: str, task: str, p: float | None, seed: int, ev: dict) -> dict:
    return {"stage": stage, "method": method, "task": task, "p": p, "seed": seed,
            **{k: ev[k] for k in ROW_KEYS[5:]}}


def clean_nan(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def results_table(rows: list[dict]) -> str:
    """A markdown table of the rows (one line per model)."""
    def f(v):
        return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    head = (f"| stage | method | task | p | seed | {hs_label(rows[0].get('judge') if rows else None)} % | comply % "
            "| FA % | over-refusal % | refusal score |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append("| " + " | ".join(f(r[k]) for k in TABLE_KEYS) + " |")
    return "\n".join(lines)


def plot_pipeline(rows: list[dict], path: str | Path) -> None:
    """HS, compliance and FA for each model of the pipeline, as grouped bars."""

    names = [r["stage"] if r["stage"] != "finetuned" else f"{r['method']} p={r['p']:g}" for r in rows]
    fig, ax = figure(figsize=(7, 3.5))
    w = 0.27
    for j, (key, label) in enumerate((("hs", hs_label(rows[0].get("judge"))), ("comply", "compliance"), ("fa", "FA"))):
        vals = [r[key] if r[key] is not None else 0.0 for r in rows]
        ax.bar([i + (j - 1) * w for i in range(len(rows))], vals, w, label=label)
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(f"toy pipeline, task {rows[0]['task']}, seed {rows[0]['seed']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_name(method: str, task: str, p: float, seed: int) -> str:
    return f"{method}-{task}-p{p:g}-s{seed}"


def write_results(out: Path, data: dict) -> None:
    """results.json (atomically), results.md and the plots of an experiment."""
    write_json_atomic(out / "results.json", data)
    (out / "results.md").write_text(experiment_report(data))
    plot_experiment(data, out)


def _stats(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    mu = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mu:.1f}"
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
    return f"{mu:.1f} ± {sd:.1f}"


def mean_of(vals):
    """The mean of the values that are not None (NaN for none)."""
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def dead_percent(sae: dict) -> str:
    """Dead latents in %: never fired on the held-out tokens / not fired in the last training window."""
    train = sae.get("dead_fraction_train")
    return f"{100 * sae['dead_fraction']:.1f} / " + ("-" if train is None else f"{100 * train:.1f}")


# how each baseline differs from its paper (printed with every report of its numbers; the method names are
# the experiment's)
ADAPTATIONS = {
    "safeinstr": "adapted: replaces a share of the task examples by refusals (the paper adds them: `safeinstr-add`)",
    "asft": "adapted: penalty on the full dW of all seven linears (the paper: LoRA on q_proj/v_proj: `asft-qv`)",
    "safelora": "adapted: full dW of all seven linears, threshold mode (the paper: LoRA on q_proj/v_proj, a fixed "
                "number of layers: `safelora-qv`)",
    "safeinstr-add": "the paper's form: the refusals are added to the task examples",
    "asft-qv": "the paper's targets (q_proj, v_proj; only they are trained), full dW instead of LoRA",
    "safelora-qv": "the paper's targets (q_proj, v_proj; only they are trained) and its number mode (10 of 64 "
                   "layers -> the lowest-cosine 16%), full dW instead of LoRA",
}


def adaptation_notes(methods) -> list[str]:
    """The lines that say, for each baseline among `methods`, whether it is its authors' form or an adaptation."""
    return [f"- `{m}`: {ADAPTATIONS[m]}" for m in methods if m in ADAPTATIONS]


def experiment_report(data: dict, title: str = "Toy-world experiment", hs_goal: float = 0.35) -> str:
    """results.md: HS/FA per method and p, the component ablation, per-task HS, the acceptance comparisons
    (among them HS(cwac) <= hs_goal x HS(sft))."""
    rows = [x for x in data["rows"] if x["stage"] == "finetuned"]
    methods = list(dict.fromkeys(x["method"] for x in rows))
    ps = sorted({x["p"] for x in rows})
    tasks = list(dict.fromkeys(x["task"] for x in rows))
    seeds = sorted({x["seed"] for x in rows})
    steps = data["settings"]["recipe"]["finetune_steps"]
    hs = data_hs_label(data)
    sel = lambda **kw: [x for x in rows if all(x[k] == v for k, v in kw.items())]  # noqa: E731
    L = [f"# {title}: {len(methods)} methods x tasks {', '.join(tasks)} x p {ps} x seeds {seeds}", "",
         f"Fine-tuning: {steps} AdamW steps (lr {data['settings']['recipe']['finetune_lr']}, batch "
         f"{data['settings']['recipe']['finetune_batch']}). Cells: mean ± sd over every (task, seed) run. {hs} = % of "
         "held-out harmful prompts whose answer the judge calls harmful (the refusal matcher: any answer that is not a "
         "refusal; lower is better); FA = task accuracy.", ""]
    kit = data["settings"].get("kit") or data["settings"].get("safety", {}).get("kit")
    if kit:  # the constraint settings the activation side ran with (the weight side: each method's targets)
        depth = kit.get("sae_depth", 0.5)  # where the SAE reads without sae_layer (older runs: the middle block)
        layer = (f"block {kit['sae_layer']}" if kit.get("sae_layer") is not None else "the middle block"
                 if depth == 0.5 else f"{depth:g} of the blocks")
        L += [f"Constraint settings: lambda {kit['lam']:g}, latents {kit['m']} (top m by score, or every firing "
              f"one), SAE after {layer}.", ""]
    base = [x for x in data["rows"] if x["stage"] == "base"]
    if base:
        L += [f"Base model: {hs} {_stats([x['hs'] for x in base])}, compliance {_stats([x['comply'] for x in base])}, "
              f"over-refusal {_stats([x['over_refusal'] for x in base])}, FA {_stats([x['fa'] for x in base])}.", ""]
    aligned = [x for x in data["rows"] if x["stage"] == "aligned"]
    L += [f"Aligned model (before fine-tuning): {hs} {_stats([x['hs'] for x in aligned])}, over-refusal "
          f"{_stats([x['over_refusal'] for x in aligned])}.", ""]
    head = "| method | " + " | ".join(f"HS p={p:g}" for p in ps) + " | " + " | ".join(f"FA p={p:g}" for p in ps) + " |"
    L += [f"## {hs} and FA by p (%)", "", head, "|" + "---|" * (1 + 2 * len(ps))]
    for m in methods:
        L.append(f"| {m} | " + " | ".join(_stats([x["hs"] for x in sel(method=m, p=p)]) for p in ps) + " | "
                 + " | ".join(_stats([x["fa"] for x in sel(method=m, p=p)]) for p in ps) + " |")
    notes = adaptation_notes(methods)
    if notes:
        L += ["", "The baselines, as run here (the same notes hold for every table below):", *notes]
    key_ps = [p for p in ps if p in (0.05, 0.1)] or ps
    L += ["", f"## Average over tasks at p in {key_ps}", "",
          f"| method | {hs} % | compliance % | FA % | over-refusal % | refusal score |", "|---|---|---|---|---|---|"]
    for m in methods:
        xs = [x for x in rows if x["method"] == m and x["p"] in key_ps]
        L.append(f"| {m} | " + " | ".join(_stats([x[k] for x in xs]) for k in
                                           ("hs", "comply", "fa", "over_refusal", "refusal_score")) + " |")
    comp = [m for m in ("sft", "weight", "activation", "cwac") if m in methods]
    if len(comp) > 1:
        L += ["", f"## Component ablation: {hs}, %", "", "| p | " + " | ".join(comp) + " |",
              "|" + "---|" * (1 + len(comp))]
        for p in ps:
            L.append(f"| {p:g} | " + " | ".join(_stats([x["hs"] for x in sel(method=m, p=p)]) for m in comp) + " |")
    if len(tasks) > 1:
        L += ["", f"## {hs} by task (%, all p > 0)", "", "| method | " + " | ".join(tasks) + " |",
              "|" + "---|" * (1 + len(tasks))]
        for m in methods:
            L.append(f"| {m} | " + " | ".join(_stats([x["hs"] for x in sel(method=m, task=t) if x["p"] > 0])
                                               for t in tasks) + " |")
    L += check_lines(rows, methods, key_ps, hs_goal, hs) + drift_table(data) + artefact_lines(data)
    parts = f", summed over the {data['parts']} merged folders" if data.get("parts", 1) > 1 else ""
    L += ["", f"Wall time: {data['wall_s']:.0f} s{parts}.", ""]
    return "\n".join(L)


def data_hs_label(data: dict) -> str:
    """HS named by the judge of an experiment's rows (settings' "judge" first; rows written before judges were
    recorded were the refusal matcher's)."""
    judge = data["settings"].get("judge") or next((x.get("judge") for x in data["rows"] if x.get("judge")), None)
    return hs_label(judge)


def check_lines(rows: list[dict], methods: list[str], key_ps: list[float], hs_goal: float,
                hs: str = "HS") -> list[str]:
    """results.md's acceptance comparisons at each key p: CWAC against each component and baseline, against
    hs_goal x SFT, and its FA against SFT's - 2."""
    sel = lambda **kw: [x for x in rows if all(x[k] == v for k, v in kw.items())]  # noqa: E731
    L = ["", f"## Checks (averaged over tasks and seeds; {hs})", ""]
    for p in key_ps:
        hs = {m: mean_of([x["hs"] for x in sel(method=m, p=p)]) for m in methods}
        fa = {m: mean_of([x["fa"] for x in sel(method=m, p=p)]) for m in methods}
        if "cwac" not in hs:
            continue
        lines = []
        for other in ("weight", "activation", "asft", "safeinstr"):
            if other in hs:
                lines.append(f"HS(cwac) {hs['cwac']:.1f} < HS({other}) {hs[other]:.1f}: "
                             f"{'yes' if hs['cwac'] < hs[other] else 'NO'}")
        if "sft" in hs:
            lines.append(f"HS(cwac) {hs['cwac']:.1f} <= {hs_goal:g} x HS(sft) {hs['sft']:.1f}: "
                         f"{'yes' if hs['cwac'] <= hs_goal * hs['sft'] else 'NO'}")
            lines.append(f"FA(cwac) {fa['cwac']:.1f} >= FA(sft) {fa['sft']:.1f} - 2: "
                         f"{'yes' if fa['cwac'] >= fa['sft'] - 2 else 'NO'}")
        L += [f"- p = {p:g}: " + "; ".join(lines)]
    return L


def rank_summary(ranks: dict) -> str:
    """The subspace ranks of a kit, {module name: (k, input dim)}: one k/in per module for up to 8 modules, else
    per kind of module (its last name part) the range of k over the layers, e.g. "down_proj 5-9/512"."""
    if len(ranks) <= 8:
        return ", ".join(f"{k}/{d}" for k, d in ranks.values())
    kinds: dict[str, list] = {}
    for name, (k, d) in ranks.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append((k, d))
    out = []
    for kind, kd in kinds.items():
        lo, hi, dims = min(k for k, _ in kd), max(k for k, _ in kd), sorted({d for _, d in kd})
        out.append(f"{kind} {lo if lo == hi else f'{lo}-{hi}'}/{'|'.join(map(str, dims))}")
    return ", ".join(out)


def artefact_lines(data: dict) -> list[str]:
    """results.md's per-seed safety artefacts (SAE quality, features, subspace ranks) and the probes' choices."""
    L = []
    if data.get("safety"):
        L += ["", "## Safety artefacts per seed", "", "| seed | SAE L0 | FVU | dead % held-out / training | CE recovered "
              "| features | subspace rank k / input dim |", "|---|---|---|---|---|---|---|"]
        for s, v in data["safety"].items():
            sae = v["sae"]
            kk = rank_summary(next(iter(v["ranks"].values())))
            L.append(f"| {s} | {sae['l0']:.1f} | {sae['fvu']:.3f} | {dead_percent(sae)} | "
                     f"{sae['ce_recovered']:.3f} | {v['n_features']} | {kk} |")
    if data.get("auto"):
        L += ["", "## Targets the probe chose (\"*-auto\" runs)", "",
              "Per run, the module kinds whose summed dW h0 covers the rule's share of the probe's total, with their "
              "shares; the drift maps are in results.json (\"auto\").", ""]
        for name, a in data["auto"].items():
            total = sum(a["by_kind"].values()) or 1.0
            L.append(f"- {name}: " + ", ".join(f"{k.rsplit('.', 1)[-1]} {a['by_kind'][k] / total:.2f}"
                                               for k in a["kinds"]))
    return L


def _drift(data: dict, method: str, p: float) -> tuple[list[int], list[float]]:
    """Steps and mean drift-curve HS over every recorded run of `method` at p (empty when none was recorded)."""
    curves = [data["curves"].get(run_name(method, x["task"], p, x["seed"])) for x in data["rows"]
              if x["stage"] == "finetuned" and x["method"] == method and x["p"] == p]
    curves = [c for c in curves if c]
    if not curves:
        return [], []
    steps = [pt["step"] for pt in curves[0]]
    return steps, [mean_of([c[i]["hs"] for c in curves if i < len(c)]) for i in range(len(steps))]


def drift_table(data: dict) -> list[str]:
    """results.md lines: HS (every third held-out harmful prompt) against fine-tuning step, per method and p > 0."""
    rows = [x for x in data["rows"] if x["stage"] == "finetuned"]
    methods = list(dict.fromkeys(x["method"] for x in rows))
    L = []
    for p in sorted({x["p"] for x in rows if x["p"] > 0}):
        curves = {m: _drift(data, m, p) for m in methods}
        curves = {m: c for m, c in curves.items() if c[0]}
        if not curves:
            continue
        steps = max((c[0] for c in curves.values()), key=len)
        if not L:
            L += ["", f"## Drift: {data_hs_label(data)} against fine-tuning step (%, every third held-out harmful "
                  "prompt)"]
        L += ["", f"p = {p:g}:", "", "| method | " + " | ".join(f"step {s}" for s in steps) + " |",
              "|" + "---|" * (1 + len(steps))]
        for m, (_, hs) in curves.items():
            L.append(f"| {m} | " + " | ".join(f"{v:.1f}" for v in hs) + " |")
    return L


def plot_experiment(data: dict, out: Path) -> None:
    """hs_vs_p.png (mean HS per method against p), fa_vs_hs.png (one point per method and p), drift.png (HS
    against fine-tuning step per method, averaged over the runs at each p; only when curves were recorded)."""

    rows = [x for x in data["rows"] if x["stage"] == "finetuned"]
    methods = list(dict.fromkeys(x["method"] for x in rows))
    ps = sorted({x["p"] for x in rows})
    hs = data_hs_label(data)
    fig, ax = figure(figsize=(6, 4))
    for m in methods:
        ax.plot(ps, [mean_of([x["hs"] for x in rows if x["method"] == m and x["p"] == p]) for p in ps], "o-", label=m)
    ax.set(xlabel="harmful ratio p", ylabel=f"{hs} % (lower is better)", ylim=(-2, 102), title=f"{hs} against p")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hs_vs_p.png", dpi=100)

    fig, ax = figure(figsize=(6, 4))
    for m in methods:
        pts = [(mean_of([x["hs"] for x in rows if x["method"] == m and x["p"] == p]),
                mean_of([x["fa"] for x in rows if x["method"] == m and x["p"] == p])) for p in ps]
        ax.scatter([a for a, _ in pts], [b for _, b in pts], label=m)
    ax.set(xlabel=f"{hs} % (lower is better)", ylabel="FA % (higher is better)",
           title="FA against HS (one point per p)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fa_vs_hs.png", dpi=100)

    if not any(data["curves"].values()):  # no drift curves were recorded
        return
    curve_ps = [p for p in ps if p > 0] or ps
    fig, axes = figure(1, len(curve_ps), figsize=(4 * len(curve_ps), 3.5), squeeze=False)
    for ax, p in zip(axes[0], curve_ps):
        for m in methods:
            steps, hs = _drift(data, m, p)
            if steps:
                ax.plot(steps, hs, label=m)
        ax.set(xlabel="fine-tuning step", ylabel=f"{hs} % (every 3rd eval prompt)", ylim=(-2, 102),
               title=f"drift, p={p:g}")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=100)


def judge_report(res: dict, rows: list[dict], width: int = 160) -> str:
    """`judge-check`'s printout: per judge the confusion matrix, accuracy, precision and recall, and the rows it
    misjudged (the request and the start of the answer)."""
    def pct(v):
        return "-" if v is None else f"{v:.1f}%"

    L = []
    judges = [("is_refusal", "refusal"), ("is_compliant", "not a refusal")]
    for name, positive in judges + ([("judge", "harmful, scored against not a refusal")] if "judge" in res else []):
        r = res[name]
        title = f"the judge {r['name']}" if name == "judge" else name  # a user's judge (--judge) by its name
        L += [f"## {title} (positive: {positive}), {r['n']} labelled answers", "",
              "| | labelled positive | labelled negative |", "|---|---|---|",
              f"| judged positive | {r['tp']} | {r['fp']} |", f"| judged negative | {r['fn']} | {r['tn']} |", "",
              f"accuracy {pct(r['accuracy'])}, precision {pct(r['precision'])}, recall {pct(r['recall'])}", "",
              f"misjudged ({len(r['misjudged'])}):"]
        for i in r["misjudged"]:
            x = rows[i]
            answer = " ".join(x["response"].split())
            L.append(f"- line {i + 1}: labelled {'refusal' if x['refusal'] else 'not a refusal'}; request: "
                     f"{' '.join(str(x.get('request', '')).split())[:80]!r}; answer: {answer[:width]!r}")
        L.append("")
    return "\n".join(L)


def drift_grid(res: dict, term: str) -> tuple[list[int], list[str], list[list[float]]]:
    """A drift map's `term` as a layer x module-kind grid: (layers, kinds, rows of values; NaN where a layer has
    no such module)."""
    from ..core.drift import module_kind

    cells = {}
    for n, v in res["linears"].items():
        prefix, kind = module_kind(n)
        cells[int(n[len(prefix):].split(".")[0]), kind] = v[term]
    kinds = list(dict.fromkeys(k for _, k in cells))
    layers = sorted({i for i, _ in cells})
    return layers, kinds, [[cells.get((i, k), math.nan) for k in kinds] for i in layers]


def plot_drift_map(res: dict, out: Path, title: str = "", by_layer: bool = True) -> None:
    """drift_map.png: per term (dW h0, W0 dh) a heat map, layer x module, of the share of ||W0 h0||;
    drift_by_layer.png (by_layer=True): the residual stream's drift ||dx|| / ||x|| after each block (and along
    the refusal direction, where known)."""

    layers, kinds, grid_dW = drift_grid(res, "dW_h0")
    grids = {"dW_h0": grid_dW, "W0_dh": drift_grid(res, "W0_dh")[2]}
    fig, axes = figure(1, 2, figsize=(4 + 0.6 * len(kinds) * 2, 1.5 + 0.25 * len(layers)), squeeze=False)
    for ax, term, label in zip(axes[0], ("dW_h0", "W0_dh"), ("dW h0: the layer's own change",
                                                              "W0 dh: drift arriving from upstream")):
        im = ax.imshow(grids[term], aspect="auto", cmap="magma")
        ax.set(xticks=range(len(kinds)), yticks=range(len(layers)), yticklabels=layers, ylabel="layer",
               title=label)
        ax.set_xticklabels([k.rsplit(".", 1)[-1] for k in kinds], rotation=45, ha="right")
        fig.colorbar(im, ax=ax, label="share of ||W0 h0||")
    fig.suptitle(title or "Where drift enters (harmful prompts)")
    fig.tight_layout()
    fig.savefig(out / "drift_map.png", dpi=100)
    if not by_layer:
        return

    fig, ax = figure(figsize=(5, 3.5))
    blocks = res["blocks"]
    ax.plot([b["layer"] for b in blocks], [b["drift"] for b in blocks], "o-", label="||dx|| / ||x||")
    if blocks and blocks[0]["refusal_drift"] is not None:
        ax.plot([b["layer"] for b in blocks], [b["refusal_drift"] for b in blocks], "s--",
                label="dx along the refusal direction / ||x||")
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="after block", ylabel="relative drift", title="Residual-stream drift by layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "drift_by_layer.png", dpi=100)
