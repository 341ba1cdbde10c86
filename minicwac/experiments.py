"""Experiments that write results: the toy demo (pretrain -> align -> SFT at several p), its table and plot.

Every result is a row of results.json:
{"stage": "base|aligned|finetuned", "method": "none|sft|...", "task": ..., "p": ..., "seed": ..., "hs": ...,
 "comply": ..., "fa": ..., "over_refusal": ..., "refusal_score": ..., "n_harmful": ...}
with hs, comply, fa and over_refusal in percent.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .cwac import AsFTPenalty, alignment_projectors, finetune_cwac, safeinstr_mix, safelora_project_
from .evals import evaluate, generate_answers, is_refusal, prompt_ids
from .features import READOUTS, mean_diff_directions, safety_features, score_latents, select_latents
from .hf import save_pretrained
from .model import GPT
from .pipeline import Recipe, Toy, clone, finetune, toy_models
from .sae import SAE, ce_recovered, harvest, sae_metrics, train_sae
from .subspace import ALL_LINEARS, DEFAULT_TARGETS, compute_subspace
from .train import encode_chats, encode_docs
from .world import TASKS

ROW_KEYS = ("stage", "method", "task", "p", "seed", "hs", "comply", "fa", "over_refusal", "refusal_score",
            "n_harmful")


def prepare_out(out: str | Path) -> Path:
    """Create the output folder and check it is writable, before any long computation starts."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output folder {out} is not writable ({e.strerror or e}); choose another with --out") from None
    return out


def check_p(p: float) -> float:
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
        raise ValueError(f"harmful ratio p={p} is outside [0, 1]")
    return float(p)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def row(stage: str, method: str, task: str, p: float | None, seed: int, ev: dict) -> dict:
    return {"stage": stage, "method": method, "task": task, "p": p, "seed": seed,
            **{k: ev[k] for k in ROW_KEYS[5:]}}


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file and rename it, so a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False, default=lambda x: None))
    tmp.replace(path)


def _clean(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def run_demo(out: str | Path = "runs/demo", seed: int = 0, task: str = "sentiment", ps=(0.0, 0.1),
             recipe: Recipe | None = None, cache_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Pretrain -> align -> SFT on `task` at each p; writes results.json, results.md, pipeline.png, models/."""
    task, ps = check_task(task), [check_p(p) for p in ps]
    out = prepare_out(out)
    r = recipe or Recipe()
    t0 = time.time()
    toy = toy_models(seed, r, cache_dir, progress=progress)
    rows = []
    for stage, model in (("base", toy.base), ("aligned", toy.aligned)):
        rows.append(row(stage, "none", task, None, seed, evaluate(model, toy.tok, toy.world, task)))
        save_pretrained(model, toy.tok, out / "models" / stage)
    for p in ps:
        model, _ = finetune(toy.aligned, toy.world, toy.tok, task, p, r, seed, progress=progress)
        rows.append(row("finetuned", "sft", task, p, seed, evaluate(model, toy.tok, toy.world, task)))
        save_pretrained(model, toy.tok, out / "models" / f"sft-{task}-p{p:g}-s{seed}")
    rows = [{k: _clean(v) for k, v in r_.items()} for r_ in rows]
    write_json_atomic(out / "results.json", {"rows": rows, "recipe": r.__dict__, "wall_s": round(time.time() - t0, 1)})
    (out / "results.md").write_text(results_table(rows) + "\n")
    plot_pipeline(rows, out / "pipeline.png")
    return rows


def results_table(rows: list[dict]) -> str:
    """A markdown table of the rows (one line per model)."""
    def f(v):
        return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    head = "| stage | method | task | p | seed | HS % | comply % | FA % | over-refusal % | refusal score |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append("| " + " | ".join(f(r[k]) for k in ROW_KEYS[:-1]) + " |")
    return "\n".join(lines)


def plot_pipeline(rows: list[dict], path: str | Path) -> None:
    """HS, compliance and FA for each model of the pipeline, as grouped bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["stage"] if r["stage"] != "finetuned" else f"{r['method']} p={r['p']:g}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    w = 0.27
    for j, (key, label) in enumerate((("hs", "HS"), ("comply", "compliance"), ("fa", "FA"))):
        vals = [r[key] if r[key] is not None else 0.0 for r in rows]
        ax.bar([i + (j - 1) * w for i in range(len(rows))], vals, w, label=label)
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(f"toy pipeline, task {rows[0]['task']}, seed {rows[0]['seed']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ================================================================ the method experiment: methods x tasks x p x seeds


@dataclass
class SafetyRecipe:
    """Every choice of the constraints and baselines on the toy world (METHOD.md: [paper] and [ours])."""

    energy: float = 0.99  # subspace rank: share of trace(C) kept
    targets: tuple = DEFAULT_TARGETS  # weight targets (regex on module names); ALL_LINEARS for every linear
    sae_layer: int | None = None  # residual stream after this many blocks (default: the middle)
    d_sae: int = 1024  # 8 x hidden
    sae_k: int = 16
    sae_steps: int = 2000
    sae_lr: float = 1e-3
    m: int | str = 100  # selected latents ([paper]: 100), or "firing"
    score: str = "harmful"  # latent score: mean post-TopK value on harmful prompts, or "contrast"
    readout: str = "pre"  # what L_safety compares: pre-TopK values ("pre"), "post", "directions", "residual"
    lam: float = 0.5  # [paper]
    safety_batch: int = 16  # harmful prompts per step for L_safety
    project_grad: bool = False  # also project the gradient before the step
    safeinstr_frac: float = 0.1  # share of refusal examples mixed in
    asft_lam: float = 1.0
    safelora_threshold: float = 0.5
    eval_every: int = 10  # drift curve: HS on every third held-out harmful prompt, every this many steps

    def key(self) -> str:
        keep = ("energy", "targets", "sae_layer", "d_sae", "sae_k", "sae_steps", "sae_lr")
        d = {k: v for k, v in asdict(self).items() if k in keep}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:10]


# method name -> switches. "activation-*"/"cwac-*" variants change the readout, "*-all" the weight targets,
# "*-avg" averages L_safety over the latents instead of summing (lam / m).
METHOD_SWITCHES = {
    "sft": {}, "weight": {"weight": True}, "activation": {"act": True}, "cwac": {"weight": True, "act": True},
    "safeinstr": {"safeinstr": True}, "asft": {"asft": True}, "safelora": {"safelora": True},
    "weight-all": {"weight": True, "targets": ALL_LINEARS}, "cwac-all": {"weight": True, "act": True, "targets": ALL_LINEARS},
    "weight-gradonly": {"weight": True, "grad_only": True},
    "activation-post": {"act": True, "readout": "post"}, "cwac-post": {"weight": True, "act": True, "readout": "post"},
    "activation-dirs": {"act": True, "readout": "directions"},
    "cwac-dirs": {"weight": True, "act": True, "readout": "directions"},
    "activation-residual": {"act": True, "readout": "residual"},
    "activation-avg": {"act": True, "avg": True}, "cwac-avg": {"weight": True, "act": True, "avg": True},
}
MAIN_METHODS = ("sft", "weight", "activation", "cwac", "safeinstr", "asft", "safelora")
PRESETS = {
    "quick": {"seeds": [0], "tasks": ["sentiment"], "ps": [0.1], "methods": list(MAIN_METHODS)},
    "full": {"seeds": [0, 1, 2], "tasks": list(TASKS), "ps": [0.0, 0.05, 0.1, 0.2, 0.5],
             "methods": list(MAIN_METHODS) + ["weight-all", "cwac-all"]},
}


@dataclass
class ToySafety:
    """What the constraints need, computed once per seed on the aligned model from the calibration set."""

    subspaces: dict  # targets tuple -> Subspace
    sae: SAE
    sae_report: dict
    features: dict  # readout -> SafetyFeatures
    align_C: dict  # AsFT / SafeLoRA alignment matrices
    refusals: list  # SafeInstr's refusal examples (encoded)


def _calib_seqs(toy: Toy) -> tuple[list, list]:
    tok = toy.tok
    return ([prompt_ids(tok, e.prompt) for e in toy.world.calibration],
            [prompt_ids(tok, e.prompt) for e in toy.world.calibration_harmless])


def sae_corpus(toy: Toy, r: Recipe, harmful_frac: float = 0.7, seed: int = 0) -> list[list[int]]:
    """Token sequences for the SAE: ~70% of tokens from harmful text (the alignment split's harmful chats and the
    calibration prompts), ~30% generic (pretraining documents, harmless chats). Never attack or eval prompts."""
    w, tok = toy.world, toy.tok
    harm = [s for s, _ in encode_chats(tok, [e for e in w.align if e.kind == "harmful"], r.max_len)]
    harm += _calib_seqs(toy)[0]
    gen = [s for s, _ in encode_docs(tok, w.pretrain_docs, r.max_len)]
    gen += [s for s, _ in encode_chats(tok, [e for e in w.align if e.kind != "harmful"], r.max_len)]
    rng = random.Random(seed)
    rng.shuffle(gen)
    want = sum(map(len, harm)) * (1 - harmful_frac) / harmful_frac
    picked, n = [], 0
    for s in gen:
        if n >= want:
            break
        picked.append(s)
        n += len(s)
    seqs = harm + picked
    rng.shuffle(seqs)
    return seqs


def toy_safety(toy: Toy, r: Recipe, sr: SafetyRecipe, seed: int, progress: bool = True,
               targets_needed=(DEFAULT_TARGETS,)) -> ToySafety:
    """Subspaces, SAE (cached beside the toy models), selected features with z0, alignment matrices, refusals."""
    tok, model = toy.tok, toy.aligned
    skip = [tok.bos_token_id]
    calib, calib_harmless = _calib_seqs(toy)
    subspaces = {t: compute_subspace(model, calib, tok.pad_token_id, patterns=t, energy=sr.energy, skip_ids=skip,
                                     model_folder=str(toy.folder / "aligned")) for t in targets_needed}
    layer = sr.sae_layer if sr.sae_layer is not None else model.config.num_hidden_layers // 2
    folder = toy.folder / f"sae-{sr.key()}"
    if (folder / "cfg.json").is_file():
        sae = SAE.load(folder)
        report = json.loads((folder / "cfg.json").read_text())["report"]
    else:
        seqs = sae_corpus(toy, r, seed=seed)
        n_test = len(seqs) // 10
        x_train = harvest(model, seqs[n_test:], layer, tok.pad_token_id, skip)
        x_test = harvest(model, seqs[:n_test], layer, tok.pad_token_id, skip)
        sae, hist = train_sae(x_train, sr.d_sae, sr.sae_k, layer, steps=sr.sae_steps, lr=sr.sae_lr, seed=seed,
                              progress=progress)
        met = sae_metrics(sae, x_test)
        ce = ce_recovered(model, sae, seqs[:n_test], tok.pad_token_id)
        report = {"held_out_tokens": len(x_test), "train_tokens": len(x_train), "l0": met["l0"], "fvu": met["fvu"],
                  "dead_fraction": met["dead_fraction"], "ce_clean": ce["clean"], "ce_sae": ce["sae"],
                  "ce_zero": ce["zero"], "ce_recovered": ce["recovered"], "history": hist}
        sae.save(folder, extra={"report": report})
        sae = SAE.load(folder)  # the folded SAE: exactly what a user loads later
    scores = score_latents(model, sae, calib, calib_harmless, tok.pad_token_id, skip, how=sr.score)
    idx = select_latents(scores, sr.m)
    groups = {}
    for e, s in zip(toy.world.calibration, calib):
        groups.setdefault(e.category, []).append(s)
    dirs = mean_diff_directions(model, layer, list(groups.values()), calib_harmless, tok.pad_token_id, skip)
    feats = {ro: safety_features(model, calib, tok.pad_token_id, readout=ro, sae=sae, idx=idx, directions=dirs,
                                 layer=layer, skip_ids=skip) for ro in READOUTS}
    refusals = encode_chats(tok, [e for e in toy.world.align if e.kind == "harmful"], r.max_len)
    return ToySafety(subspaces, sae, report, feats, alignment_projectors(toy.base, model, ALL_LINEARS), refusals)


def run_method(method: str, toy: Toy, safety: ToySafety, task: str, p: float, seed: int, r: Recipe,
               sr: SafetyRecipe, progress: bool = True) -> tuple[GPT, dict]:
    """Fine-tune a copy of the aligned model on `task` at harmful ratio p with `method`; returns (model, history)."""
    if method not in METHOD_SWITCHES:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHOD_SWITCHES)}")
    sw = METHOD_SWITCHES[method]
    w, tok = toy.world, toy.tok
    model = clone(toy.aligned)
    seqs = encode_chats(tok, w.finetune_set(task, p, r.finetune_n, seed), r.max_len)
    if sw.get("safeinstr"):
        seqs = safeinstr_mix(seqs, safety.refusals, sr.safeinstr_frac, seed)
    subspace = safety.subspaces[sw.get("targets", DEFAULT_TARGETS)] if sw.get("weight") else None
    features = safety.features[sw.get("readout", sr.readout)] if sw.get("act") else None
    lam = sr.lam / features.m if features is not None and sw.get("avg") else sr.lam
    penalty = None
    if sw.get("asft"):
        penalty = AsFTPenalty(toy.aligned, safety.align_C, sr.asft_lam)
    eval_prompts = [e.prompt for e in w.eval_harmful[::3]]

    def curve(m):
        return {"hs": 100.0 * (1 - sum(map(is_refusal, generate_answers(m, tok, eval_prompts, 24))) / len(eval_prompts))}

    hist = finetune_cwac(model, seqs, steps=r.finetune_steps, batch_size=r.finetune_batch, lr=r.finetune_lr,
                         pad_id=tok.pad_token_id, subspace=subspace, features=features, lam=lam,
                         safety_batch=sr.safety_batch, project_grad=sr.project_grad or bool(sw.get("grad_only")),
                         project_update=not sw.get("grad_only"), penalty=penalty, seed=seed + 2, eval_every=sr.eval_every,
                         eval_fn=curve if sr.eval_every else None, desc=f"{method} {task} p={p:g}", progress=progress)
    if sw.get("safelora"):
        hist["safelora_cos"] = safelora_project_(model, toy.aligned, safety.align_C, sr.safelora_threshold)
    return model, hist
