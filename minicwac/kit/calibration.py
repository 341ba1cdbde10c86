"""The safety kit: what the constraints need, made once from the aligned model by `calibrate`.

A kit folder:
    kit.json               settings, the model's fingerprint, the SAE report, the subspace ranks (and, with
                           --targets auto, the rule, the probe and its drift map), the calibration's warnings, the
                           sha256 of every other file and of its own content (checked by `Kit.load`)
    subspace/              S and W0S per target linear (+ the eigenvalues, for the spectrum plot)
    sae/                   the SAE (scale folded in)
    features.safetensors   the calibration prompts (ids, kept tokens), the selected latents idx and z0
    report.md, spectrum.png (and drift_map.png with --targets auto)
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.data import Seq, encode_docs, mix_by_tokens, shared_prefix
from ..core.drift import probe_targets
from ..core.evals import prompt_ids
from ..core.features import SafetyFeatures, check_sae_layer, safety_features, score_latents, select_latents
from ..core.files import atomic_folder, file_sha256, read_json, recover
from ..core.hooks import block_name, model_device, num_blocks
from ..core.sae import SAE, ce_recovered, harvest, sae_metrics, train_sae
from ..core.settings import TARGETS, KitSettings, default_settings, method
from ..core.subspace import Subspace, compute_subspace
from ..tools.report import figure, plot_drift_map

KIT_VERSION = 2  # the folder layout's version, recorded in kit.json (2: kit.json records the files' sha256)


def fingerprint(model) -> dict:
    """What identifies the model a kit belongs to: its parameter names and shapes (hashed), and their count; LoRA
    adapters (`core.lora`'s and PEFT's, whose base weights PEFT renames `base_layer`) are not part of it. The weights
    themselves are checked by W S = W0 S when the kit is loaded."""
    # without the adapters: a kit made on the base weights still fits once LoRA is added
    params = [(n.replace(".base_layer.", "."), p) for n, p in model.named_parameters() if ".lora_" not in n]
    shapes = [(n, list(p.shape)) for n, p in params]  # [(name, [dims])], in module order
    # names and shapes only: any change of architecture shows here, a change of weights does not (W S = W0 S
    # catches that, in `load`). names_sha256 ignores the order: minicwac's GPT and transformers' class of the same
    # checkpoint register their modules in different orders
    return {"params": sum(p.numel() for _, p in params), "n_tensors": len(shapes),
            "shapes_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16],
            "names_sha256": hashlib.sha256(json.dumps(sorted(shapes)).encode()).hexdigest()[:16]}


def same_model(fp_kit: dict, fp: dict) -> bool:
    """Whether a kit's recorded fingerprint is that of the model with fingerprint `fp`: the same counts and the same
    names and shapes, in module order or (a kit that records it) in any order."""
    if fp_kit.get("params") != fp["params"] or fp_kit.get("n_tensors") != fp["n_tensors"]:
        return False
    return fp_kit.get("shapes_sha256") == fp["shapes_sha256"] or fp_kit.get("names_sha256") == fp["names_sha256"]


@dataclass
class Kit:
    """Everything the constraints need, made once from the aligned model."""

    settings: KitSettings  # what `calibrate` was called with, checked
    subspace: Subspace  # S and W0S of every target linear
    features: SafetyFeatures  # the SAE, the selected latents, the calibration prompts and z0
    fingerprint: dict  # the model's, see `fingerprint`
    report: dict = field(default_factory=dict)  # SAE metrics, subspace ranks, prompt counts

    def constraint(self, name: str, run: str = "kit") -> tuple[Subspace | None, SafetyFeatures | None]:
        """The subspace and the features the method `name` uses (its row of `core.settings.METHODS`)."""
        # the method's row: its weight targets (a TARGETS key, "auto" or None) and whether L_safety is on
        row = method(name, run)
        targets, act = row.weight, row.activation
        # a subspace holds only the layers it was calibrated on: `all` cannot be cut from a down_proj kit
        if targets == "all" and self.settings.targets != "all":
            raise ValueError(f"method {name} constrains every linear, but the kit was calibrated with --targets "
                             f"{self.settings.targets}; calibrate again with --targets all")
        # `auto` needs the probe's choice, which only a calibration with --probe-data records
        if targets == "auto" and "auto" not in self.report:
            raise ValueError(f"method {name} constrains the module kinds a probe chose, but the kit was "
                             f"calibrated with --targets {self.settings.targets} and no probe; calibrate again with "
                             "--targets auto --probe-data FILE")
        sub = None
        if targets is not None:
            # a kit of every linear serves the down_proj methods too: the matching layers are cut out
            sub = self.subspace.matching(self.report["auto"]["patterns"] if targets == "auto" else TARGETS[targets])
        return sub, (self.features if act else None)  # the features only for a method with the activation side

    def save(self, path: str | Path) -> Path:
        """The kit folder (see the module docstring), written atomically; kit.json, written last, records the
        sha256 of every other file and of its own content (`kit_digests`, `meta_digest`)."""
        f = self.features
        with atomic_folder(path) as tmp:
            self.subspace.save(tmp / "subspace")  # S, W0S, the spectra and cfg.json
            f.sae.save(tmp / "sae")  # its scale already folded in (`kit_sae`)
            # the calibration prompts exactly as z0 was read on them: L_safety indexes both by the same rows
            save_file({"ids": f.ids.cpu().contiguous(), "keep": f.keep.to(torch.uint8).cpu().contiguous(),
                       "z0": f.z0.float().cpu().contiguous(), "idx": f.idx.cpu().contiguous()},
                      str(tmp / "features.safetensors"))
            (tmp / "report.md").write_text(kit_report(self))
            plot_spectrum(self.subspace, tmp / "spectrum.png")
            if "auto" in self.report:  # the probe's drift map, when a probe ran
                plot_drift_map(self.report["auto"]["map"], tmp, "the probe's drift map (targets auto)",
                               by_layer=False)
            # layer and readout: what `load` needs to rebuild SafetyFeatures; the digests of the files above
            meta = {"version": KIT_VERSION, "settings": asdict(self.settings), "fingerprint": self.fingerprint,
                    "layer": f.layer, "readout": f.readout, "report": self.report, "files": kit_digests(tmp)}
            (tmp / "kit.json").write_text(json.dumps({**meta, "sha256": meta_digest(meta)}, indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, model, device=None) -> "Kit":
        """Read a kit folder and check it: every file against its sha256 in kit.json, S orthonormal, shapes and
        latent indices, and that it belongs to `model` (same shapes, W S = W0 S on its weights)."""
        path = Path(path)
        recover(path)  # a save interrupted mid-rename: the last complete kit is read
        meta = read_kit_json(path)  # and every file checked against its digest
        try:  # a damaged or foreign folder: one line naming the error, not a traceback
            settings = KitSettings(**meta["settings"])  # an unknown field raises TypeError, caught below
            layer, readout, fp_kit = int(meta["layer"]), meta["readout"], dict(meta["fingerprint"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path / 'kit.json'} is not a readable kit ({type(e).__name__}: {e})") from None
        try:  # safetensors raises its own error type for a truncated or corrupt file
            t = load_file(str(path / "features.safetensors"))
            # keep back to bool (it is stored as uint8)
            ids, keep, z0, idx = t["ids"], t["keep"].bool(), t["z0"], t["idx"]
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path / 'features.safetensors'} is not readable ({type(e).__name__}: {e})") from None
        device = model_device(model) if device is None else device  # beside the model unless told otherwise
        fp = fingerprint(model)
        if not same_model(fp_kit, fp):  # the cheap check first: names and shapes, before any weight is read
            raise ValueError(f"kit {path} was made for another model ({fp_kit.get('params')} parameters in "
                             f"{fp_kit.get('n_tensors')} tensors, shapes {fp_kit.get('shapes_sha256')}); this one has "
                             f"{fp['params']} in {fp['n_tensors']}, shapes {fp['shapes_sha256']}")
        sub = Subspace.load(path / "subspace", device)  # S orthonormal, W0S beside it (`check_basis`)
        from ..io import dist
        if dist.is_sharded(model):  # FSDP2 (`dist.load_pretrained`): every rank checks its rows
            err = dist.max_over_ranks(sub.shard(model).ws_error(model))
        else:
            err = sub.ws_error(model)  # ||W S - W0S|| / ||W0S||: about 0 on the weights the kit was made from
        if not err <= 1e-4:  # the bound a kit is refused above (docs/method.md#3-weight-side-the-safety-subspace)
            raise ValueError(f"kit {path} was made for other weights of this architecture: |W S - W0S| / |W0S| = "
                             f"{err:.2g} (expected <= 1e-4 on the model it was calibrated on)")
        sae = SAE.load(path / "sae", device).requires_grad_(False)  # frozen: L_safety trains the model, never the SAE
        # z0 is not recomputed: the kit's values are the aligned model's, whatever model loads them
        feats = SafetyFeatures(layer, readout, ids.to(device), keep.to(device), z0.to(device), sae, idx.to(device))
        feats.check(str(path / "features.safetensors"))  # shapes, and latent indices inside the SAE
        if not 1 <= layer <= num_blocks(model):
            raise ValueError(f"{path / 'kit.json'}: layer {layer}, expected 1..{num_blocks(model)} (the model's "
                             "blocks)")
        return cls(settings, sub, feats, fp, meta.get("report", {}))


def kit_digests(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file in a kit folder but kit.json (which holds them)."""
    files = sorted(f for f in Path(folder).rglob("*") if f.is_file() and f.relative_to(folder).as_posix() != "kit.json")
    return {f.relative_to(folder).as_posix(): file_sha256(f) for f in files}


def meta_digest(meta: dict) -> str:
    """The sha256 of kit.json's content without its own "sha256" field: keys sorted, as JSON reads it back (a file
    cannot hold its own digest, so its parsed content is hashed)."""
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))  # tuples read back as lists
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_kit_json(path: Path) -> dict:
    """kit.json, after the layout and every digest it records are checked: a flipped byte or a truncated file
    anywhere in the kit is refused in one line naming the file. A kit saved before the digests (version 1) is
    read with the structural checks of `Kit.load` only, with a warning."""
    for f in ("kit.json", "features.safetensors", "subspace", "sae"):  # the layout first: names the missing piece
        if not (path / f).exists():
            raise FileNotFoundError(f"{path / f} not found: a kit folder is written by `python -m minicwac "
                                    "calibrate` (kit.json, features.safetensors, subspace/, sae/)")
    meta = read_json(path / "kit.json", "a kit's record (a JSON object)")
    version = meta.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= KIT_VERSION:
        raise ValueError(f"{path / 'kit.json'}: version {version!r}, expected 1..{KIT_VERSION} (a newer minicwac "
                         "made it, or it is not a kit)")
    if version == 1:  # before the digests: nothing to check them against
        warnings.warn(f"{path} was saved by an older minicwac and records no sha256 of its files: it is checked for "
                      "shapes, S orthonormal and W S = W0 S only; calibrate again for a kit whose files are checked",
                      stacklevel=3)
        return meta
    files = meta.get("files")
    if not isinstance(files, dict) or not files or meta.get("sha256") != meta_digest(meta):
        raise ValueError(f"{path / 'kit.json'} does not match the sha256 it recorded at save (it was changed "
                         "since); calibrate again")
    for name, digest in files.items():
        f = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:  # only files inside the kit are read
            raise ValueError(f"{path / 'kit.json'} lists {name!r}, a file outside the kit folder")
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: kit.json lists it; the kit is incomplete, calibrate again")
        if file_sha256(f) != digest:
            raise ValueError(f"{f} does not match the sha256 kit.json recorded at save (it was changed or "
                             "truncated since); calibrate again, or restore the file")
    return meta


def generic_corpus(n: int = 2000) -> list[str]:
    """A small generic English text the package builds offline (the toy world's documents, seed 0): the ~30% of
    SAE training tokens that are not harmful prompts, when no --corpus is given."""
    from ..toy.world import build_world  # the toy world is a text source here, nothing more
    return build_world(0).pretrain_docs[:n]  # seed 0: the same text for every kit


def calibrate(model, tok, harmful: list[str], harmless: list[str] | None = None, corpus: list[str] | None = None,
              settings: KitSettings | None = None, max_len: int = 256, sae_seqs: list[list[int]] | None = None,
              probe_seqs: list[Seq] | None = None, sae_folder: str | Path | None = None,
              progress: bool = True) -> Kit:
    """Make a safety kit from the aligned `model`: the subspace of the target linears on the harmful prompts,
    a TopK SAE on the residual stream (harmful prompts + generic text), the safety latents (mean on harmful
    minus mean on harmless prompts when those are given, else the mean on harmful) and their baseline z0.

    sae_seqs: the SAE's token sequences, when the caller mixes its own (else the harmful prompts and `corpus`,
    harmful_frac of the tokens from the prompts).
    probe_seqs: the fine-tuning data (`encode_data`), needed by targets="auto": a copy of the model is trained on
    it for probe_steps steps and its drift map on the harmful prompts picks the target kinds (`probe_targets`);
    with targets "down_proj" or "all" the choice is only recorded (then "cwac-auto" works if "all").
    sae_folder: a cache for the SAE: read from it when it holds one, else trained and written there.
    settings: None for the defaults (`core.settings.default_settings`: the rule's choice, or the paper's while none
    is committed); the report records which ("chosen", "paper" or "given")."""
    s, defaults = default_settings() if settings is None else (settings, "given")
    s = s.check()  # a ValueError before any work
    if not harmful:
        raise ValueError("no harmful prompts to calibrate on")
    if s.targets == "auto" and not probe_seqs:
        raise ValueError("targets auto needs the fine-tuning data for its probe (probe_seqs; on the command line "
                         "--probe-data FILE)")
    score = s.score or ("contrast" if harmless else "harmful")  # contrast when harmless prompts are given
    if score == "contrast" and not harmless:
        raise ValueError("score 'contrast' needs harmless prompts (harmful minus harmless latent means)")
    model.eval()  # calibration reads the model, it never trains it (the probe trains a copy)
    pad, skip = tok.pad_token_id, [tok.bos_token_id]  # BOS left out: its activations are outliers on real models
    # chat-formatted, ending in the generation prompt, as at evaluation
    calib = [prompt_ids(tok, p)[:max_len] for p in harmful]
    calib_harmless = [prompt_ids(tok, p)[:max_len] for p in harmless] if harmless else None
    counts, notes = prompt_notes(calib, calib_harmless, max_len)  # too few distinct prompts: refused here
    pre = shared_prefix(calib) if s.skip_prefix else 0  # the shared opening's length (e.g. a system line), or 0
    auto = None
    if probe_seqs:  # the map is read on the calibration prompts (a dev split), never on evaluation prompts
        auto = probe_targets(model, probe_seqs, calib, pad, calib_harmless, skip, steps=s.probe_steps,
                             lr=s.probe_lr, batch_size=s.probe_batch, seed=s.seed, share=s.auto_share,
                             progress=progress)
        model.eval()  # every read below in eval mode
    # the probe's choice for targets auto, else the key's regexes
    patterns = auto["patterns"] if s.targets == "auto" else TARGETS[s.targets]
    # weight side: S and W0S of every target, from the inputs those layers see on the harmful prompts
    sub = compute_subspace(model, calib, pad, patterns=patterns, energy=s.energy, skip_ids=skip,
                           skip_prefix=pre, progress=progress)
    layer = check_sae_layer(s.sae_layer, num_blocks(model), s.sae_depth)  # None: after sae_depth of the blocks
    n_docs = None
    if sae_seqs is None:  # the harmful prompts (~harmful_frac of the tokens) and generic documents (the rest)
        docs = [ids for ids, _ in encode_docs(tok, corpus if corpus is not None else generic_corpus(), max_len)]
        sae_seqs = mix_by_tokens(calib, docs, s.harmful_frac, s.seed)
        n_docs = len(sae_seqs) - len(calib)  # the generic documents picked, for the report
    # activation side, step 1: the SAE (or its cached copy)
    sae, sae_report = kit_sae(model, sae_seqs, layer, s, pad, skip, sae_folder, progress)
    ev = sae_report.get("explained_variance")
    if ev is not None and not ev >= MIN_EXPLAINED_VARIANCE:  # NaN too
        notes.append(note(f"the SAE explains {ev:.2f} of the residual stream's variance on held-out tokens (below "
                          f"{MIN_EXPLAINED_VARIANCE}): its latents describe little of what the model computes there; "
                          "train it longer (--sae-steps) or on more text (--corpus)"))
    # step 2: a score for every latent on the calibration prompts
    scores = score_latents(model, sae, calib, calib_harmless, pad, skip, how=score, skip_prefix=pre)
    idx = select_latents(scores, s.m)  # step 3: the top m (or every firing one)
    if len(idx) == 0:  # m = "firing" and no latent fires
        raise ValueError("no SAE latent scores above 0 on the harmful prompts: nothing to protect (try another "
                         "--sae-layer or a number for --m)")
    # step 4: z0, the aligned model's pre-TopK readout of those latents, stored with the prompts
    feats = safety_features(model, calib, pad, readout="pre", sae=sae, idx=idx, layer=layer, skip_ids=skip,
                            skip_prefix=pre)
    # what report.md and kit.json record
    report = {"defaults": defaults, "hook_name": block_name(model, layer), "n_harmful": len(harmful),
              "n_harmless": len(harmless or []), **counts, "warnings": notes,
              "n_corpus_docs": n_docs, "skip_prefix_tokens": pre, "score": score, "n_latents": int(len(idx)),
              "sae": {k: v for k, v in sae_report.items() if k != "history"}, "ranks": sub.cfg["ranks"]}
    if auto is not None:
        report["auto"] = auto
    return Kit(s, sub, feats, fingerprint(model), report)


# Fewer distinct harmful prompts than this are refused. The subspace is the span of the tokens those prompts put
# through each target, the latents are ranked by a mean over them and z0 is read on them: with a handful, S is
# those few sentences' own directions and the "safety latents" are whatever those sentences share (wording,
# length), not harm. 8 is the smallest set the package itself calibrates on (the `real` preset cpu-smoke) and half
# the default L_safety batch; a floor against meaningless kits, not a recommendation (the measured runs use 32-270).
MIN_DISTINCT_HARMFUL = 8
# Below this explained variance (1 - FVU on held-out tokens) the kit is written with a warning: an SAE that
# reconstructs less than half the residual stream's variance reads latents that miss most of it (the kits of
# docs/results.md explain 0.97 and more).
MIN_EXPLAINED_VARIANCE = 0.5


def note(text: str) -> str:
    """A warning about the calibration, shown now on stderr and kept for report.md and kit.json."""
    warnings.warn(text, stacklevel=3)
    return text


def prompt_notes(calib: list[list[int]], calib_harmless: list[list[int]] | None,
                 max_len: int) -> tuple[dict, list[str]]:
    """Distinct harmful prompts as the model reads them (chat-formatted, cut to max_len tokens): fewer than
    MIN_DISTINCT_HARMFUL are refused; repeats and prompts in both sets are warned about. Returns the counts for
    the report and the warnings."""
    distinct = {tuple(c) for c in calib}
    if len(distinct) < MIN_DISTINCT_HARMFUL:
        raise ValueError(f"{len(calib)} harmful prompts ({len(distinct)} distinct once chat-formatted and cut to "
                         f"{max_len} tokens): calibration needs at least {MIN_DISTINCT_HARMFUL} distinct ones (a "
                         "subspace and latents read on fewer describe those sentences, not harm)")
    notes, overlap = [], 0
    if len(distinct) < len(calib):  # kept: a repeat weighs its prompt more, as the user's file asks
        notes.append(note(f"{len(calib) - len(distinct)} of the {len(calib)} harmful prompts repeat another (as the "
                          f"model reads them, cut to {max_len} tokens): {len(distinct)} distinct; a repeated prompt "
                          "weighs more in the subspace, the latent scores and L_safety"))
    if calib_harmless:
        overlap = len(distinct & {tuple(c) for c in calib_harmless})
        if overlap:
            notes.append(note(f"{overlap} of the {len(distinct)} distinct harmful prompts are also among the harmless "
                              "ones: their latents cancel in the contrast score"))
    return {"n_harmful_distinct": len(distinct), "n_overlap": overlap}, notes


def kit_sae(model, seqs: list[list[int]], layer: int, s: KitSettings, pad: int, skip: list[int],
            folder: str | Path | None = None, progress: bool = True) -> tuple[SAE, dict]:
    """The kit's SAE, trained on the residual stream after `layer` blocks over `seqs` (the first tenth held out
    for its metrics), scale folded in; and its report (metrics + training history). With `folder`: read from
    there when it holds an SAE, else written there once trained."""
    # a cached SAE is taken as is: the folder's name must say what it was trained with (the toy's carries
    # a hash of the SAE settings, `SafetyRecipe.key`)
    if folder is not None and (Path(folder) / "cfg.json").is_file():
        report = read_json(Path(folder) / "cfg.json", "an SAE's cfg.json")["report"]
        return SAE.load(folder, model_device(model)), report
    n_test = max(1, len(seqs) // 10)  # a tenth held out, at least one sequence
    x_train = harvest(model, seqs[n_test:], layer, pad, skip)  # (tokens, hidden)
    x_test = harvest(model, seqs[:n_test], layer, pad, skip)  # (tokens, hidden)
    d_sae = s.d_sae or 8 * x_train.shape[1]  # 8 x hidden
    if s.sae_k > d_sae:  # k at most d_sae (said); batches of at most 1024 tokens
        warnings.warn(f"sae_k={s.sae_k} is more than the SAE's {d_sae} latents: k = {d_sae} is used", stacklevel=2)
    sae, hist = train_sae(x_train, d_sae, min(s.sae_k, d_sae), layer, steps=s.sae_steps, lr=s.sae_lr, seed=s.seed,
                          batch_size=min(1024, len(x_train)), device=model_device(model), progress=progress)
    met = sae_metrics(sae, x_test)  # FVU, L0 and dead latents on the held-out tokens
    # the LM loss with the SAE's reconstruction in place of the residual stream
    ce = ce_recovered(model, sae, seqs[:n_test], pad)
    sae.fold_scale_()  # s folded into the weights: the saved SAE takes raw activations
    report = {"explained_variance": 1 - met["fvu"], "fvu": met["fvu"], "l0": met["l0"],
              "dead_fraction": met["dead_fraction"],  # never fired on the held-out tokens
              # the field's definition: not fired in the last dead_tokens training tokens
              "dead_fraction_train": hist["dead_fraction"][-1] if hist["dead_fraction"] else None,
              "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"], "ce_recovered": ce["recovered"],
              "train_tokens": len(x_train), "held_out_tokens": len(x_test), "history": hist}
    if folder is not None:  # the cache for the next calibration with these settings
        sae.save(folder, extra={"report": report})
    return sae, report


# what kit.json's report["defaults"] says, in report.md's words
KIT_DEFAULTS = {"chosen": "the defaults, which the committed rule chose on a real model's held-out dev prompts "
                          "(docs/results.md), with any flags over them",
                "paper": "the paper's, with any flags over them", "given": "as the caller gave them"}


def kit_report(kit: Kit) -> str:
    """report.md: settings, SAE quality, the safety latents, the subspace rank of every target."""
    r, s = kit.report, kit.settings
    sae = r.get("sae", {})
    dead_train = sae.get("dead_fraction_train")
    dead_train = "-" if dead_train is None else f"{100 * dead_train:.1f}"  # None: no training history
    # markdown lines, joined at the end
    n, n_distinct = r.get("n_harmful"), r.get("n_harmful_distinct")
    distinct = f" ({n_distinct} distinct)" if n_distinct is not None and n_distinct != n else ""
    L = ["# Safety kit", "", f"Calibrated on {n} harmful prompts{distinct} ({r.get('n_harmless')} harmless "
         f"for the latent scores, {r.get('n_corpus_docs')} generic documents for the SAE).", ""]
    if r.get("warnings"):  # the calibration's warnings (`prompt_notes`, the SAE's explained variance)
        L += ["## Warnings", "", *[f"- {w}" for w in r["warnings"]], ""]
    if r.get("defaults") in KIT_DEFAULTS:  # older kits do not record it
        L += [f"Settings: {KIT_DEFAULTS[r['defaults']]}.", ""]
    L += ["| setting | value |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in asdict(s).items()]  # one row per setting
    L += ["", "## SAE (residual stream after block " f"{kit.features.layer}, held-out tokens)", "",
          "| explained variance | L0 | dead % (held-out / training window) | CE recovered |", "|---|---|---|---|",
          f"| {sae.get('explained_variance', float('nan')):.3f} | {sae.get('l0', float('nan')):.1f} | "
          f"{100 * sae.get('dead_fraction', float('nan')):.1f} / "
          f"{dead_train} | "
          f"{sae.get('ce_recovered', float('nan')):.3f} |", "",
          f"Safety latents: {r.get('n_latents')} (score: {r.get('score')}).", "",
          "## Subspace rank k / in per target (energy " f"{s.energy})", "", "| layer | k | in | k / in |",
          "|---|---|---|---|"]
    for n, (k, d) in kit.subspace.ranks().items():  # (k, in) per target
        L.append(f"| {n} | {k} | {d} | {k / d:.2f} |")
    L += ["", "![spectrum](spectrum.png)", ""]
    auto = r.get("auto")
    if auto:
        # total: the sum over the kinds, the shares' denominator
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
        ev = ev.double().clamp(min=0)  # float64 for the cumulative sums
        if float(ev.sum()) <= 0:  # inputs that were all zero: no shares to plot
            continue
        cum = (ev.cumsum(0) / ev.sum()).numpy()  # cum[i]: the share of trace(C) in the top i + 1 eigenvalues
        x = [(i + 1) / len(ev) for i in range(len(ev))]  # k / in: layers of every width on one axis
        ax.plot(x, cum, lw=0.8, alpha=0.7, label=n if len(sub.spectra) <= 8 else None)
    energy = sub.cfg.get("energy")
    # the energy cut-off: a line's k is where it crosses
    if energy:
        ax.axhline(energy, color="k", ls="--", lw=0.8)
    ax.set(xlabel="k / in (top eigenvectors of C)", ylabel="share of trace(C)", ylim=(0, 1.02),
           title="Safety subspace: energy captured by rank")
    if len(sub.spectra) <= 8:  # more lines than that: a legend would hide the plot
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------- python -m minicwac calibrate


def add_arguments(p) -> None:
    from ..cli import add_setting_flags, positive_int
    p.add_argument("--model", required=True, help="the aligned model (a Hugging Face folder)")
    p.add_argument("--harmful", required=True, help="harmful prompts (.txt/.csv/.jsonl) to calibrate on")
    p.add_argument("--harmless", default=None, help="harmless prompts: latents scored harmful minus harmless")
    p.add_argument("--corpus", default=None,
                   help="generic text for the SAE, .txt one document per line (default: a small built-in one)")
    p.add_argument("--out", required=True, help="the kit folder to write")
    p.add_argument("--probe-data", default=None,
                   help="--targets auto: your fine-tuning JSONL (as finetune --data); with --targets all the "
                        "choice is recorded too, for --method cwac-auto")
    # every KitSettings field as a flag, with its help; unset, the defaults' value (the rule's choice or --paper's)
    add_setting_flags(p, KitSettings, base=default_settings()[0])
    p.add_argument("--paper", action="store_true",
                   help="start from the paper's settings (down_proj, lambda 0.5, the top 100 latents, the SAE after "
                        "the middle block) instead of the defaults; other flags still override them")
    p.add_argument("--max-len", type=positive_int, default=256, help="tokens per prompt or document (256)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> None:
    from ..cli import settings_from
    from ..io.hf import load_checkpoint
    from ..io.prompts import load_prompts
    from .data import encode_data, load_conversations
    base, defaults = default_settings(paper=args.paper)  # the rule's choice, or the paper's
    s = settings_from(args, base).check()  # the flags over them
    # flags that do not go together: refused before the model is loaded
    if s.targets == "auto" and not args.probe_data:
        raise ValueError("--targets auto needs --probe-data (your fine-tuning JSONL: the probe trains on it)")
    if args.probe_data and s.targets == "down_proj":
        raise ValueError("--probe-data is for --targets auto (or all); the down_proj kit does not use it")
    conversations = load_conversations(args.probe_data) if args.probe_data else None
    harmful = load_prompts(args.harmful)
    harmless = load_prompts(args.harmless) if args.harmless else None
    corpus = None
    # one document per non-empty line
    if args.corpus:
        corpus = [ln.strip() for ln in Path(args.corpus).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not corpus:
            raise ValueError(f"{args.corpus} holds no text")
    # checked before the long calibration, not after it: a kit is never written over other files
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise FileExistsError(f"{args.out} exists and is not empty; choose another --out for the kit")
    model, tok = load_checkpoint(args.model, args.device)
    # [0]: the sequences ([1]: how many were cut)
    probe = encode_data(tok, conversations, args.max_len)[0] if conversations else None
    kit = calibrate(model, tok, harmful, harmless, corpus, s, max_len=args.max_len, probe_seqs=probe,
                    progress=not args.quiet)
    kit.report["model"] = str(args.model)  # the folder it was calibrated on, for whoever reads the report
    kit.report["defaults"] = defaults  # the settings the flags were put over: "chosen" or "paper"
    kit.save(args.out)
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote the kit {args.out} (kit.json, subspace/, sae/, features.safetensors, report.md, spectrum.png)")
