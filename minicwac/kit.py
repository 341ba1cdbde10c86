"""CWAC on your own model and your own data: calibrate a safety kit once, fine-tune with it, evaluate.

    kit = calibrate(model, tok, harmful_prompts, harmless_prompts)      # subspace + SAE + latents + z0
    kit.save("kit/")                                                    # safetensors + JSON, and a report
    kit = Kit.load("kit/", model)                                       # refused if made for another model
    seqs = encode_data(tok, load_conversations("task.jsonl"), max_len=512)
    finetune(model, tok, seqs, kit, "out/", method="cwac", steps=200)   # a Hugging Face folder + history

Everything here takes a model with Hugging Face module names and a chat tokenizer; the method itself is the
core's (`minicwac.core`). The command line (`python -m minicwac calibrate | finetune | eval`) calls these.

A kit folder:
    kit.json               settings, the model's fingerprint, the SAE report, the subspace ranks (and, with
                           --targets auto, the rule, the probe and its drift map)
    subspace/              S and W0S per target linear (+ the eigenvalues, for the spectrum plot)
    sae/                   the SAE (scale folded in)
    features.safetensors   the calibration prompts (ids, kept tokens), the selected latents idx and z0
    report.md, spectrum.png (and drift_map.png with --targets auto)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .core.cwac import finetune_cwac
from .core.data import Seq, encode_conversations, encode_docs, mix_by_tokens, shared_prefix
from .core.drift import AUTO_SHARE, probe_targets
from .core.evals import harmful_score, prompt_ids
from .core.features import (SafetyFeatures, check_latents, check_sae_layer, safety_features, score_latents,
                            select_latents)
from .core.files import atomic_folder, recover, write_json_atomic
from .core.hooks import block_name, model_device, num_blocks
from .core.lora import LoRASettings, add_lora, lora_modules, merge_lora, save_adapter
from .core.sae import SAE, ce_recovered, harvest, sae_metrics, train_sae
from .core.subspace import ALL_LINEARS, DEFAULT_TARGETS, Subspace, compute_subspace
from .report import figure, plot_drift_map

TARGETS = {"down_proj": DEFAULT_TARGETS, "all": ALL_LINEARS}  # and "auto": chosen by a probe (`probe_targets`)
TARGET_CHOICES = (*TARGETS, "auto")
# method -> (weight constraint on these targets or None, activation constraint)
METHODS = {"sft": (None, False), "weight": ("down_proj", False), "activation": (None, True),
           "cwac": ("down_proj", True), "weight-all": ("all", False), "cwac-all": ("all", True),
           "weight-auto": ("auto", False), "cwac-auto": ("auto", True)}
DTYPES = {"fp32": None, "bf16-mixed": torch.bfloat16}  # the autocast dtype over float32 weights
KIT_VERSION = 1


# ---------------------------------------------------------------- the kit


@dataclass
class KitSettings:
    """The constraint settings a kit is made with; [paper] and [ours] as in the method notes,
    docs/method.md#9-choices-where-the-paper-is-silent."""

    targets: str = "down_proj"  # weight side: "down_proj" [paper], "all" (every linear of every block) or "auto"
    # (the module kinds a short SFT probe's drift map names, `core.drift.probe_targets`) [ours]
    energy: float = 0.99  # subspace rank: share of trace(C) kept [ours]
    sae_layer: int | None = None  # residual stream after this many blocks (None: the middle) [ours]
    m: int | str = 100  # safety latents [paper: 100], or "firing"
    lam: float = 0.5  # weight of L_safety [paper]
    skip_prefix: bool = False  # leave out the prompt opening every calibration prompt shares [ours]
    d_sae: int | None = None  # SAE width (None: 8 x hidden) [ours]
    sae_k: int = 32  # SAE L0 [ours]
    sae_steps: int = 2000
    sae_lr: float = 1e-3
    harmful_frac: float = 0.7  # share of SAE training tokens from harmful prompts [paper: ~70%]
    seed: int = 0
    probe_steps: int = 20  # --targets auto: SFT steps of the probe on the fine-tuning data [ours]
    probe_lr: float = 2e-5  # (finetune's default)
    probe_batch: int = 8
    auto_share: float = AUTO_SHARE  # the kinds whose summed dW_h0 covers this share of the probe's total [ours]

    def check(self) -> "KitSettings":
        if self.targets not in TARGET_CHOICES:
            raise ValueError(f"targets={self.targets!r}, expected one of {', '.join(TARGET_CHOICES)}")
        if not 0 < self.auto_share <= 1:
            raise ValueError(f"auto_share={self.auto_share}, expected a fraction in (0, 1]")
        if not (self.probe_steps >= 1 and self.probe_batch >= 1 and self.probe_lr > 0):
            raise ValueError(f"probe_steps={self.probe_steps}, probe_batch={self.probe_batch}, "
                             f"probe_lr={self.probe_lr}: expected positive values")
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy={self.energy}, expected a fraction in (0, 1]")
        if not self.lam >= 0:
            raise ValueError(f"lam={self.lam}, expected >= 0")
        if not 0 < self.harmful_frac <= 1:
            raise ValueError(f"harmful_frac={self.harmful_frac}, expected (0, 1]")
        check_latents(self.m)
        return self


def fingerprint(model) -> dict:
    """What identifies the model a kit belongs to: its parameter names and shapes (hashed), and their count; LoRA
    adapters (`core.lora`) are not part of it. The weights themselves are checked by W S = W0 S when the kit is
    loaded."""
    params = [(n, p) for n, p in model.named_parameters() if not n.endswith((".lora_A", ".lora_B"))]
    shapes = [(n, list(p.shape)) for n, p in params]
    return {"params": sum(p.numel() for _, p in params), "n_tensors": len(shapes),
            "shapes_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]}


@dataclass
class Kit:
    """Everything the constraints need, made once from the aligned model."""

    settings: KitSettings
    subspace: Subspace
    features: SafetyFeatures
    fingerprint: dict
    report: dict = field(default_factory=dict)  # SAE metrics, ranks, prompt counts

    def constraint(self, method: str) -> tuple[Subspace | None, SafetyFeatures | None]:
        """The subspace and the features a fine-tuning `method` uses."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        targets, act = METHODS[method]
        sub = None
        if targets == "all" and self.settings.targets != "all":
            raise ValueError(f"method {method} constrains every linear, but the kit was calibrated with --targets "
                             f"{self.settings.targets}; calibrate again with --targets all")
        if targets == "auto" and "auto" not in self.report:
            raise ValueError(f"method {method} constrains the module kinds a probe chose, but the kit was "
                             f"calibrated with --targets {self.settings.targets} and no probe; calibrate again with "
                             "--targets auto --probe-data FILE")
        if targets is not None:
            sub = self.subspace.matching(self.report["auto"]["patterns"] if targets == "auto" else TARGETS[targets])
        return sub, (self.features if act else None)

    def save(self, path: str | Path) -> Path:
        """The kit folder (see the module docstring), written atomically."""
        f = self.features
        with atomic_folder(path) as tmp:
            self.subspace.save(tmp / "subspace")
            f.sae.save(tmp / "sae")
            save_file({"ids": f.ids.cpu().contiguous(), "keep": f.keep.to(torch.uint8).cpu().contiguous(),
                       "z0": f.z0.float().cpu().contiguous(), "idx": f.idx.cpu().contiguous()},
                      str(tmp / "features.safetensors"))
            (tmp / "kit.json").write_text(json.dumps(
                {"version": KIT_VERSION, "settings": asdict(self.settings), "fingerprint": self.fingerprint,
                 "layer": f.layer, "readout": f.readout, "report": self.report}, indent=2))
            (tmp / "report.md").write_text(kit_report(self))
            plot_spectrum(self.subspace, tmp / "spectrum.png")
            if "auto" in self.report:
                plot_drift_map(self.report["auto"]["map"], tmp, "the probe's drift map (targets auto)",
                               by_layer=False)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, model, device=None) -> "Kit":
        """Read a kit folder and check that it belongs to `model` (same shapes, W S = W0 S on its weights)."""
        path = Path(path)
        recover(path)
        for f in ("kit.json", "features.safetensors", "subspace", "sae"):
            if not (path / f).exists():
                raise FileNotFoundError(f"{path / f} not found: a kit folder is written by `python -m minicwac "
                                        "calibrate` (kit.json, features.safetensors, subspace/, sae/)")
        try:
            meta = json.loads((path / "kit.json").read_text())
            settings = KitSettings(**meta["settings"])
            t = load_file(str(path / "features.safetensors"))
            ids, keep, z0, idx = t["ids"], t["keep"].bool(), t["z0"], t["idx"]
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise ValueError(f"{path} is not a readable kit ({type(e).__name__}: {e})") from None
        device = model_device(model) if device is None else device
        fp = fingerprint(model)
        if meta["fingerprint"] != fp:
            kf = meta["fingerprint"]
            raise ValueError(f"kit {path} was made for another model ({kf['params']} parameters in {kf['n_tensors']} "
                             f"tensors, shapes {kf['shapes_sha256']}); this one has {fp['params']} in "
                             f"{fp['n_tensors']}, shapes {fp['shapes_sha256']}")
        sub = Subspace.load(path / "subspace", device)
        from . import dist
        if dist.is_sharded(model):  # FSDP2 (`dist.load_pretrained`): every rank checks its rows
            err = dist.max_over_ranks(sub.shard(model).mismatch(model))
        else:
            err = sub.mismatch(model)
        if err > 1e-4:
            raise ValueError(f"kit {path} was made for other weights of this architecture: |W S - W0S| / |W0S| = "
                             f"{err:.2g} (expected <= 1e-4 on the model it was calibrated on)")
        sae = SAE.load(path / "sae", device).requires_grad_(False)
        feats = SafetyFeatures(meta["layer"], meta["readout"], ids.to(device), keep.to(device), z0.to(device), sae,
                               idx.to(device))
        return cls(settings, sub, feats, fp, meta.get("report", {}))


def generic_corpus(n: int = 2000) -> list[str]:
    """A small generic English text the package builds offline (the toy world's documents, seed 0): the ~30% of
    SAE training tokens that are not harmful prompts, when no --corpus is given."""
    from .toy.world import build_world  # the toy world is a text source here, nothing more
    return build_world(0).pretrain_docs[:n]


def calibrate(model, tok, harmful: list[str], harmless: list[str] | None = None, corpus: list[str] | None = None,
              settings: KitSettings | None = None, max_len: int = 256, sae_seqs: list[list[int]] | None = None,
              probe_seqs: list[Seq] | None = None, progress: bool = True) -> Kit:
    """Make a safety kit from the aligned `model`: the subspace of the target linears on the harmful prompts,
    a TopK SAE on the residual stream (harmful prompts + generic text), the safety latents (mean on harmful
    minus mean on harmless prompts when those are given, else the mean on harmful) and their baseline z0.

    sae_seqs: the SAE's token sequences, when the caller mixes its own (else the harmful prompts and `corpus`,
    harmful_frac of the tokens from the prompts).
    probe_seqs: the fine-tuning data (`encode_data`), needed by targets="auto": a copy of the model is trained on
    it for probe_steps steps and its drift map on the harmful prompts picks the target kinds (`probe_targets`);
    with targets "down_proj" or "all" the choice is only recorded (then "cwac-auto" works if "all")."""
    s = (settings or KitSettings()).check()
    if not harmful:
        raise ValueError("no harmful prompts to calibrate on")
    if s.targets == "auto" and not probe_seqs:
        raise ValueError("targets auto needs the fine-tuning data for its probe (probe_seqs; on the command line "
                         "--probe-data FILE)")
    model.eval()
    pad = tok.pad_token_id
    skip = [tok.bos_token_id]
    calib = [prompt_ids(tok, p)[:max_len] for p in harmful]
    calib_ok = [prompt_ids(tok, p)[:max_len] for p in harmless] if harmless else None
    pre = shared_prefix(calib) if s.skip_prefix else 0
    auto = None
    if probe_seqs:  # the map is read on the calibration prompts (a dev split), never on evaluation prompts
        auto = probe_targets(model, probe_seqs, calib, pad, calib_ok, skip, steps=s.probe_steps, lr=s.probe_lr,
                             batch_size=s.probe_batch, seed=s.seed, share=s.auto_share, progress=progress)
        model.eval()
    patterns = auto["patterns"] if s.targets == "auto" else TARGETS[s.targets]
    sub = compute_subspace(model, calib, pad, patterns=patterns, energy=s.energy, skip_ids=skip,
                           skip_prefix=pre, progress=progress)
    layer = check_sae_layer(s.sae_layer, num_blocks(model))
    if sae_seqs is None:  # the harmful prompts (~harmful_frac of the tokens) and generic documents (the rest)
        docs = [ids for ids, _ in encode_docs(tok, corpus if corpus is not None else generic_corpus(), max_len)]
        seqs = mix_by_tokens(calib, docs, s.harmful_frac, s.seed)
        n_docs = len(seqs) - len(calib)
    else:
        seqs, n_docs = sae_seqs, None
    n_test = max(1, len(seqs) // 10)
    x_train = harvest(model, seqs[n_test:], layer, pad, skip)
    x_test = harvest(model, seqs[:n_test], layer, pad, skip)
    d_sae = s.d_sae or 8 * x_train.shape[1]  # 8 x hidden
    sae, hist = train_sae(x_train, d_sae, min(s.sae_k, d_sae), layer, steps=s.sae_steps, lr=s.sae_lr, seed=s.seed,
                          batch_size=min(1024, len(x_train)), device=model_device(model), progress=progress)
    met = sae_metrics(sae, x_test)
    ce = ce_recovered(model, sae, seqs[:n_test], pad)
    sae.fold_scale_()
    score = "contrast" if calib_ok else "harmful"
    scores = score_latents(model, sae, calib, calib_ok, pad, skip, how=score, skip_prefix=pre)
    idx = select_latents(scores, s.m)
    if len(idx) == 0:
        raise ValueError("no SAE latent scores above 0 on the harmful prompts: nothing to protect (try another "
                         "--sae-layer or a number for --m)")
    feats = safety_features(model, calib, pad, readout="pre", sae=sae, idx=idx, layer=layer, skip_ids=skip,
                            skip_prefix=pre)
    report = {"hook_name": block_name(model, layer), "n_harmful": len(harmful), "n_harmless": len(harmless or []),
              "n_corpus_docs": n_docs,
              "skip_prefix_tokens": pre, "score": score, "n_latents": int(len(idx)),
              "sae": {"explained_variance": 1 - met["fvu"], "fvu": met["fvu"], "l0": met["l0"],
                      "dead_fraction": met["dead_fraction"],
                      "dead_fraction_train": hist["dead_fraction"][-1] if hist["dead_fraction"] else None,
                      "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"],
                      "ce_recovered": ce["recovered"], "train_tokens": len(x_train), "held_out_tokens": len(x_test)},
              "ranks": sub.cfg["ranks"]}
    if auto is not None:
        report["auto"] = auto
    return Kit(s, sub, feats, fingerprint(model), report)


def kit_report(kit: Kit) -> str:
    """report.md: settings, SAE quality, the safety latents, the subspace rank of every target."""
    r, s = kit.report, kit.settings
    sae = r.get("sae", {})
    dead_train = sae.get("dead_fraction_train")
    dead_train = "-" if dead_train is None else f"{100 * dead_train:.1f}"
    L = ["# Safety kit", "", f"Calibrated on {r.get('n_harmful')} harmful prompts ({r.get('n_harmless')} harmless "
         f"for the latent scores, {r.get('n_corpus_docs')} generic documents for the SAE).", "",
         "| setting | value |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in asdict(s).items()]
    L += ["", "## SAE (residual stream after block " f"{kit.features.layer}, held-out tokens)", "",
          "| explained variance | L0 | dead % (held-out / training window) | CE recovered |", "|---|---|---|---|",
          f"| {sae.get('explained_variance', float('nan')):.3f} | {sae.get('l0', float('nan')):.1f} | "
          f"{100 * sae.get('dead_fraction', float('nan')):.1f} / "
          f"{dead_train} | "
          f"{sae.get('ce_recovered', float('nan')):.3f} |", "",
          f"Safety latents: {r.get('n_latents')} (score: {r.get('score')}).", "",
          "## Subspace rank k / in per target (energy " f"{s.energy})", "", "| layer | k | in | k / in |",
          "|---|---|---|---|"]
    for n, (k, d) in kit.subspace.ranks().items():
        L.append(f"| {n} | {k} | {d} | {k / d:.2f} |")
    L += ["", "![spectrum](spectrum.png)", ""]
    auto = r.get("auto")
    if auto:
        pr, total = auto["probe"], sum(auto["by_kind"].values())
        L += ["## Targets chosen by the probe", "",
              f"A copy of the model trained {pr['steps']} SFT steps (lr {pr['lr']:g}, batch {pr['batch_size']}) on "
              f"{pr['n_seqs']} fine-tuning sequences, its drift map read on {pr['n_prompts']} calibration prompts. "
              f"Rule: {auto['rule']}. Chosen: {', '.join(auto['kinds'])}.", "",
              "| module kind | dW h0 relative to W0 h0, summed over layers | share |", "|---|---|---|"]
        L += [f"| {k} | {v:.4f} | {v / total:.2f} |" for k, v in auto["by_kind"].items()]
        L += ["", "![drift map](drift_map.png)", ""]
    return "\n".join(L)


def plot_spectrum(sub: Subspace, path: Path) -> None:
    """Cumulative share of trace(C) against k / in, one line per target (the rank cut-off marked)."""

    fig, ax = figure(figsize=(6, 4))
    for n, ev in sub.spectra.items():
        ev = ev.double().clamp(min=0)
        if float(ev.sum()) <= 0:
            continue
        cum = (ev.cumsum(0) / ev.sum()).numpy()
        x = [(i + 1) / len(ev) for i in range(len(ev))]
        ax.plot(x, cum, lw=0.8, alpha=0.7, label=n if len(sub.spectra) <= 8 else None)
    energy = sub.cfg.get("energy")
    if energy:
        ax.axhline(energy, color="k", ls="--", lw=0.8)
    ax.set(xlabel="k / in (top eigenvectors of C)", ylabel="share of trace(C)", ylim=(0, 1.02),
           title="Safety subspace: energy captured by rank")
    if len(sub.spectra) <= 8:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------- data


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Conversations from a JSONL file: one {"messages": [{"role", "content"}, ...]} or {"prompt", "completion"}
    object per line (blank lines skipped). Every error names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a JSONL file of conversations")
    out = []
    with path.open(encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where} is not valid JSON ({e})") from None
            if isinstance(d, dict) and "messages" in d:
                msgs = d["messages"]
                if not isinstance(msgs, list) or not msgs:
                    raise ValueError(f"{where}: \"messages\" must be a non-empty list of {{role, content}} objects")
                for i, m in enumerate(msgs):
                    if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                            and isinstance(m.get("content"), str)):
                        raise ValueError(f"{where}: message {i} must be an object with string \"role\" and "
                                         f"\"content\", got {json.dumps(m)[:80]}")
                if not any(m["role"] == "assistant" for m in msgs):
                    raise ValueError(f"{where}: the conversation has no assistant turn (nothing to train on)")
                out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
            elif isinstance(d, dict) and isinstance(d.get("prompt"), str) and isinstance(d.get("completion"), str):
                out.append([{"role": "user", "content": d["prompt"]},
                            {"role": "assistant", "content": d["completion"]}])
            else:
                raise ValueError(f"{where}: expected {{\"messages\": [...]}} or "
                                 f"{{\"prompt\": str, \"completion\": str}}")
    if not out:
        raise ValueError(f"{path} holds no conversations")
    return out


def encode_data(tok, conversations: list[list[dict]], max_len: int,
                too_long: str = "truncate") -> tuple[list[Seq], int]:
    """Render with the model's chat template; loss on the assistant tokens only. A sequence longer than max_len
    is cut (too_long="truncate") or refused ("refuse"). Returns (sequences, number cut)."""
    if too_long not in ("truncate", "refuse"):
        raise ValueError(f"too_long={too_long!r}, expected 'truncate' or 'refuse'")
    seqs, cut = [], 0
    for i, (ids, mask) in enumerate(encode_conversations(tok, conversations, max_len=None)):
        if not any(mask):
            raise ValueError(f"conversation {i + 1}: the chat template marks no assistant token (nothing to train on)")
        if len(ids) > max_len:
            if too_long == "refuse":
                raise ValueError(f"conversation {i + 1} has {len(ids)} tokens, more than --max-len {max_len} "
                                 "(raise --max-len or pass --too-long truncate)")
            cut += 1
            ids, mask = ids[:max_len], mask[:max_len]
            if not any(mask):
                raise ValueError(f"conversation {i + 1}: no assistant token is left in its first {max_len} tokens "
                                 "(raise --max-len)")
        seqs.append((ids, mask))
    return seqs, cut


# ---------------------------------------------------------------- fine-tuning with checkpoints


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
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
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
        from . import dist
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
        from .hf import save_pretrained  # minicwac's own model class writes Hugging Face folders
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


__all__ = ["Kit", "KitSettings", "calibrate", "finetune", "load_conversations", "encode_data", "fingerprint"]
