"""Benchmarks (`python -m minicwac bench --what step`): timings are reported, never asserted in tests.

step: the CWAC step against the SFT step on the toy model's shapes, in the same loop, and where the extra time
goes (the safety forward up to the SAE layer, the encoding of the selected latents, the projection).
"""
from __future__ import annotations

import time

import torch

from .evals import prompt_ids
from .features import safety_features
from .pipeline import Recipe, build_tokenizer, new_model
from .sae import SAE, SAEConfig
from .subspace import compute_subspace
from .train import batches, collate, encode_chats, lm_loss, make_optimizer
from .world import build_world


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fns: dict, device, repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time in ms of each fn, run in turns (fn1, fn2, ..., fn1, ...) so that a slow spell of the
    machine hits every candidate alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            ts[k].append(1000 * (time.perf_counter() - t))
    return {k: sorted(v)[len(v) // 2] for k, v in ts.items()}


def bench_step(device: str = "cpu", repeats: int = 30, warmup: int = 5, m: int = 100, safety_batch: int = 16,
               task: str = "sentiment", seed: int = 0) -> dict:
    """ms per SFT step and per CWAC step (toy recipe shapes, random init: timing does not depend on training)."""
    r = Recipe()
    world = build_world(seed)
    tok = build_tokenizer(world, r.vocab_size)
    model = new_model(tok, r, seed, device)
    seqs = encode_chats(tok, world.finetune_set(task, 0.1, r.finetune_n, seed), r.max_len)
    calib = [prompt_ids(tok, e.prompt) for e in world.calibration]
    sub = compute_subspace(model, calib, tok.pad_token_id, skip_ids=[tok.bos_token_id]).to(device)
    layer = r.num_hidden_layers // 2
    sae = SAE(SAEConfig(r.hidden_size, 8 * r.hidden_size, 16, layer), device=device)
    feats = safety_features(model, calib, tok.pad_token_id, readout="pre", sae=sae, idx=torch.arange(m, device=device),
                            layer=layer, skip_ids=[tok.bos_token_id])
    opt = make_optimizer(model, 1e-4, 0.1)
    data = batches(seqs, r.finetune_batch, seed)
    fixed = [collate(next(data), tok.pad_token_id, device) for _ in range(4)]
    g = torch.Generator().manual_seed(seed)
    it = {"i": 0}

    def task_batch():
        it["i"] += 1
        return fixed[it["i"] % len(fixed)]

    def pick():
        return torch.randint(len(feats.ids), (safety_batch,), generator=g).to(device)

    def sft_step():
        loss = lm_loss(model, *task_batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def cwac_step():
        loss = lm_loss(model, *task_batch()) + 0.5 * feats.loss(model, pick())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sub.project_(model)

    def safety_fwd_bwd():
        feats.loss(model, pick()).backward()
        model.zero_grad(set_to_none=True)

    x_cached = model(feats.ids[pick()], stop_at_layer=layer).detach().requires_grad_()

    def sae_encode():
        sae.pre_acts(x_cached, feats.idx).sum().backward()

    def projection():
        sub.project_(model)

    model.train()
    res = {"device": str(device), "threads": torch.get_num_threads(), "params": model.num_params(),
           "task_batch": tuple(fixed[0][0].shape), "safety_batch": (safety_batch, feats.ids.shape[1]), "m": m,
           "subspace_k": sum(k for k, _ in sub.ranks().values()),
           **_time({"sft_ms": sft_step, "cwac_ms": cwac_step, "safety_forward_backward_ms": safety_fwd_bwd,
                    "sae_encode_ms": sae_encode, "projection_ms": projection}, device, repeats, warmup)}
    res["ratio"] = res["cwac_ms"] / res["sft_ms"]
    return res


def format_step(res: dict) -> str:
    return "\n".join([
        f"CWAC step vs SFT step on {res['device']} ({res['threads']} threads), toy model {res['params'] / 1e6:.2f}M "
        f"params, task batch {res['task_batch']}, safety batch {res['safety_batch']}, {res['m']} latents, "
        f"subspace k = {res['subspace_k']} over 4 down_proj",
        "| part | ms |", "|---|---|",
        f"| SFT step | {res['sft_ms']:.2f} |",
        f"| CWAC step | {res['cwac_ms']:.2f} |",
        f"| - L_safety forward + backward (blocks up to the SAE layer, encode) | {res['safety_forward_backward_ms']:.2f} |",
        f"|   - of which the SAE encode of the selected latents (+ backward) | {res['sae_encode_ms']:.2f} |",
        f"| - projection W <- W - (W S - W0S) S^T | {res['projection_ms']:.2f} |",
        f"| ratio CWAC / SFT | {res['ratio']:.2f} (goal <= 1.30) |"])
