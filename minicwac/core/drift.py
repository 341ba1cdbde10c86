"""Where drift enters: the paper's first-order decomposition, measured for every linear of every block.

For a linear y = W h + b, fine-tuning changes the weight (W = W0 + dW), the bias (b = b0 + db, where there is
one: Qwen2's q/k/v, GPT-2's linears) and the input (h = h0 + dh), so on the same prompt

    y - y0 = W0 dh  +  dW h0  +  dW dh  +  db
             ^^^^^     ^^^^^     ^^^^^     ^^
             drift     drift     second    the layer's
             arriving  the layer order     bias shift
             from      adds                (0 without a bias)
             upstream  itself

The weight constraint (W - W0) S = 0 removes `dW h0` for inputs h0 in the safety subspace; the activation
constraint holds the residual stream at one layer, and so `dh` downstream of it. `drift_map` measures, on harmful
prompts, each term's size relative to ||W0 h0|| (sums over prompt tokens), the exact change and the second-order
rest, and the residual stream's drift ||dx|| / ||x|| after every block, also along the refusal direction (the
aligned model's mean residual on harmful prompts minus on harmless ones, where harmless prompts are given).

Nothing here knows a model class: the two models need the same module names (minicwac's GPT, a transformers
model, a LoRA model merged or not).
"""
from __future__ import annotations

import copy
import re

import torch

from .data import prompt_batches
from .features import mean_diff_directions
from .hooks import block_list, capture, model_device
from .settings import AUTO_SHARE

TERMS = ("dW_h0", "W0_dh", "exact", "second_order", "db")


def _linears(model) -> list[str]:
    blocks, _ = block_list(model)
    # the linears inside the decoder blocks (a LoRA layer is an nn.Linear too); lm_head is not in a block
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(blocks + ".")]


def _weight(model, name: str) -> torch.Tensor:
    m = model.get_submodule(name)
    merged = getattr(m, "merged", None)  # a LoRA layer: its effective weight W0 + scale B A
    return (merged() if callable(merged) else m.weight).detach().float()


def _bias(model, name: str, weight: torch.Tensor) -> torch.Tensor:
    """The linear's bias (out,) as float32 beside `weight`; zeros for a linear without one."""
    b = model.get_submodule(name).bias
    return weight.new_zeros(len(weight)) if b is None else b.detach().float().to(weight.device)


@torch.no_grad()
def drift_map(base, tuned, prompts: list[list[int]], pad_id: int, harmless: list[list[int]] | None = None,
              skip_ids=(), batch_size: int = 16) -> dict:
    """Per linear (module name -> {term: ||term|| / ||W0 h0||}) and per block (residual drift), on the token ids of
    `prompts` (chat-formatted harmful prompts, held out). Every norm is summed over the kept tokens before the
    ratio. Returns {"linears": {name: {...}}, "blocks": [{"layer", "drift", "refusal_drift"}], "n_tokens"}."""
    if not prompts:
        raise ValueError("no prompts to measure drift on; expected harmful prompts (token ids)")
    names = _linears(base)
    missing = [n for n in names if n not in dict(tuned.named_modules())]
    if missing:
        raise ValueError(f"the fine-tuned model has no module {missing[0]!r}; expected the base model's names")
    blocks_name, blocks = block_list(base)
    outs = [f"{blocks_name}.{i}" for i in range(len(blocks))]  # block outputs: the residual stream after each
    W0 = {n: _weight(base, n) for n in names}  # (out, in) each, float32
    dW = {n: _weight(tuned, n) - W0[n] for n in names}  # taken once: every batch reuses it
    # (out,) each: the bias shift, the same on every token (a target's bias is frozen by the weight constraint)
    db = {n: _bias(tuned, n, W0[n]) - _bias(base, n, W0[n]) for n in names}
    # running sums over the kept tokens of each term's norm; "ref" is ||W0 h0||, what every term is divided by
    sums = {n: dict.fromkeys(("ref",) + TERMS, 0.0) for n in names}
    # per block: sums of ||dx||, of ||x0|| and of dx's component along the refusal direction
    res = [{"drift": 0.0, "norm": 0.0, "proj": 0.0} for _ in outs]
    direction = None
    if harmless:  # the refusal direction after every block: (n_blocks, hidden)
        direction = mean_diff_directions(base, list(range(1, len(outs) + 1)), [prompts], harmless, pad_id, skip_ids,
                                         batch_size=batch_size)[..., 0]
    n_tok = 0
    for ids, keep in prompt_batches(prompts, pad_id, model_device(base), batch_size, skip_ids):
        # one forward of each model on the same prompts reads every linear's input and every block's output
        with capture(base, names, what="input") as h0s, capture(base, outs) as x0s:
            base(ids)
        with capture(tuned, names, what="input") as hs, capture(tuned, outs) as xs:
            tuned(ids.to(model_device(tuned)))
        for n in names:
            # the same token positions in both models: h0 and h line up row by row
            h0, h = h0s[n][keep].float(), hs[n][keep].float().to(h0s[n].device)  # (tokens, in)
            dh = h - h0  # the drift this linear receives from upstream
            y0 = h0 @ W0[n].T  # (tokens, out): the aligned model's output
            shift = db[n].expand_as(y0)  # (tokens, out): the same shift on every token
            # y - y0 = W0 dh + dW h0 + dW dh + db; "exact" is the left side itself, computed directly
            terms = {"dW_h0": h0 @ dW[n].T, "W0_dh": dh @ W0[n].T, "exact": h @ (W0[n] + dW[n]).T + shift - y0,
                     "second_order": dh @ dW[n].T, "db": shift}  # (tokens, out) each
            sums[n]["ref"] += float(y0.norm(dim=-1).sum())
            for k, v in terms.items():
                sums[n][k] += float(v.norm(dim=-1).sum())  # per-token norms, summed
        for b, o in enumerate(outs):
            x0, x = x0s[o][keep].float(), xs[o][keep].float().to(x0s[o].device)  # (tokens, hidden)
            res[b]["drift"] += float((x - x0).norm(dim=-1).sum())
            res[b]["norm"] += float(x0.norm(dim=-1).sum())
            if direction is not None:
                # signed: < 0 when fine-tuning moves harmful prompts towards the harmless side
                res[b]["proj"] += float(((x - x0) @ direction[b]).sum())  # (tokens, hidden) @ (hidden,)
        n_tok += int(keep.sum())
    # ratios of sums, not means of per-token ratios: tokens with a tiny ||W0 h0|| do not dominate
    linears = {n: {k: s[k] / max(s["ref"], 1e-30) for k in TERMS} for n, s in sums.items()}
    blocks_out = [{"layer": b + 1, "drift": r["drift"] / max(r["norm"], 1e-30),
                   "refusal_drift": None if direction is None else r["proj"] / max(r["norm"], 1e-30)}
                  for b, r in enumerate(res)]
    return {"linears": linears, "blocks": blocks_out, "n_tokens": n_tok}


# ---------------------------------------------------------------- choosing the constrained modules from a map

def module_kind(name: str) -> tuple[str, str]:
    """(blocks prefix, kind) of a linear inside a block: "model.layers.3.mlp.down_proj" -> ("model.layers.",
    "mlp.down_proj")."""
    m = re.fullmatch(r"(.*?\.)\d+\.(.+)", name)  # the first number in the name is the block's
    if m is None:
        raise ValueError(f"{name!r} is not a linear inside a numbered block; expected e.g. model.layers.3.mlp.down_proj")
    return m.group(1), m.group(2)


def choose_targets(dmap: dict, share: float = AUTO_SHARE) -> dict:
    """The rule of `calibrate --targets auto`: sum each module kind's dW_h0 + db (the drift its own weight and bias
    change add, relative to its output) over the layers, rank the kinds by it, and keep the smallest set of top
    kinds whose sum reaches `share` of the total. Returns {"rule", "share", "by_kind" (kind -> sum, ranked), "kinds",
    "patterns" (regexes on module names, as `compute_subspace` takes)}."""
    if not 0 < share <= 1:
        raise ValueError(f"share={share}, expected a fraction in (0, 1]")
    by_kind, prefix = {}, {}
    # the module's own change, dW_h0 (+ db, its bias shift, which the constraint freezes), not the exact change:
    # the weight constraint acts on the drift a module's own update adds, while W0_dh arrives from upstream
    for name, terms in dmap["linears"].items():
        pre, kind = module_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + terms["dW_h0"] + terms.get("db", 0.0)
        prefix.setdefault(kind, pre)
    if not by_kind:
        raise ValueError("the drift map has no linears to choose from")
    ranked = dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))  # largest first; ties keep the model's order
    total, acc, kinds = sum(ranked.values()), 0.0, []
    for kind, v in ranked.items():  # greedy: the top kinds until their share reaches `share`
        kinds.append(kind)
        acc += v
        if acc >= share * total:
            break
    # every layer of each chosen kind: "model\.layers\.\d+\.mlp\.down_proj"
    patterns = [re.escape(prefix[k]) + r"\d+\." + re.escape(k) for k in kinds]
    return {"rule": f"smallest set of module kinds, ranked by their summed (dW_h0 + db) / ||W0 h0|| over layers, "
                    f"that covers {share:g} of the total", "share": share, "by_kind": ranked, "kinds": kinds,
            "patterns": patterns}


def probe_targets(model, seqs, prompts: list[list[int]], pad_id: int, harmless: list[list[int]] | None = None,
                  skip_ids=(), steps: int = 20, lr: float = 2e-5, batch_size: int = 8, seed: int = 0,
                  share: float = AUTO_SHARE, progress: bool = False) -> dict:
    """`choose_targets` on the map of a short SFT probe: a copy of `model` trained `steps` steps on `seqs` (the
    fine-tuning data, with its labels), measured on `prompts` (harmful prompts of a dev split: never the ones a
    result is reported on). Returns the choice with "probe" (its settings and loss) and "map" (the drift map)."""
    from .cwac import train

    probe = copy.deepcopy(model)  # the model itself stays as it was: the map compares the two
    hist = train(probe, seqs, steps=steps, batch_size=batch_size, lr=lr, pad_id=pad_id, seed=seed, desc="probe",
                 progress=progress)
    dmap = drift_map(model, probe, prompts, pad_id, harmless, skip_ids)
    del probe
    return {**choose_targets(dmap, share),
            "probe": {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "n_seqs": len(seqs),
                      "n_prompts": len(prompts), "loss_first": hist["loss"][0], "loss_last": hist["loss"][-1]},
            "map": dmap}
