"""`python -m minicwac drift-map`: where drift enters between an aligned and a fine-tuned model, on held-out
harmful prompts: dW h0 and W0 dh for every linear, the residual stream's drift by layer (`core.drift`)."""
from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--base", required=True, help="the aligned model (a Hugging Face folder)")
    p.add_argument("--tuned", required=True, help="the fine-tuned model (same architecture)")
    p.add_argument("--harmful", required=True, help="held-out harmful prompts (.txt/.csv/.jsonl)")
    p.add_argument("--harmless", default=None, help="harmless prompts: the refusal direction, for its drift")
    p.add_argument("--out", default="runs/drift-map", help="output folder (default runs/drift-map)")
    p.add_argument("--device", default="cpu")


def run(args) -> None:
    import torch

    from ..core.drift import drift_map
    from ..core.evals import prompt_ids
    from ..core.files import prepare_out, write_json_atomic
    from ..io.hf import load_checkpoint
    from ..io.prompts import load_prompts
    from .report import plot_drift_map
    for model in (args.base, args.tuned):  # its files beside a model's would be taken for the model's
        if Path(args.out).resolve() == Path(model).resolve():
            raise ValueError(f"--out {args.out} is the model folder {model}; choose a folder of its own")
    # before the models are read: new or empty, or a previous drift map's folder (its files, nothing else)
    out = prepare_out(args.out, ("drift_map.json", "drift_map.png", "drift_by_layer.png"))
    harmful = load_prompts(args.harmful)
    harmless = load_prompts(args.harmless) if args.harmless else None
    base, tok = load_checkpoint(args.base, args.device, torch.float32)
    tuned, _ = load_checkpoint(args.tuned, args.device, torch.float32)
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
