"""Benchmarks (`python -m minicwac bench --what step|model`): timings are reported, never asserted in tests.

step: the CWAC step against the SFT step on the toy model's shapes, in the same loop, and where the extra time
goes (the safety forward up to the SAE layer, the encoding of the selected latents, the projection).
model: on a real model shape (llama-1b, llama-8b, or tiny for CPU), minicwac's SFT step against transformers'
LlamaForCausalLM, the CWAC step against the SFT step, and the subspace extraction time.
"""
from __future__ import annotations

import time

import torch

from ..core.cwac import Constraints, Schedule, cwac_step, finetune_cwac
from ..core.data import batches, collate, make_optimizer
from ..core.evals import prompt_ids
from ..core.features import check_sae_layer, safety_features
from ..core.hooks import residual
from ..core.sae import SAE, SAEConfig
from ..core.settings import SEED_SAFETY, KitSettings
from ..core.subspace import compute_subspace
from ..io.config import Config
from ..io.model import GPT
from ..toy.pipeline import Recipe, build_tokenizer, encode_chats, new_model
from ..toy.world import build_world
from .plan import SHAPES


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


LAM = KitSettings().lam  # the paper's lambda (any lambda > 0 costs the same)


def step_setup(device: str = "cpu", m: int = 100, safety_batch: int = 16, task: str = "sentiment", seed: int = 0,
               layer: int | None = None) -> dict:
    """What bench_step times: a toy-shaped model (random init: timing does not depend on training), its optimizer,
    subspace and m safety latents read after `layer` blocks, and the two steps as closures. The task batches and
    the safety picks are the ones `finetune_cwac(seqs, batch_size=16, seed=seed, lr=1e-4, lam=LAM)` draws first
    (4 batches, then again from the first), so the first `cwac()` call is that loop's first step."""
    r = Recipe()
    if not 1 <= m <= 8 * r.hidden_size:
        raise ValueError(f"m={m} latents, expected 1..{8 * r.hidden_size} (the toy SAE's width)")
    layer = check_sae_layer(layer, r.num_hidden_layers)
    world = build_world(seed)
    tok = build_tokenizer(world, r.vocab_size)
    model = new_model(tok, r, seed, device)
    seqs = encode_chats(tok, world.finetune_set(task, 0.1, r.finetune_n, seed), r.max_len)
    calib = [prompt_ids(tok, e.prompt) for e in world.calibration]
    sub = compute_subspace(model, calib, tok.pad_token_id, skip_ids=[tok.bos_token_id]).to(device)
    sae = SAE(SAEConfig(r.hidden_size, 8 * r.hidden_size, 16, layer), device=device)
    feats = safety_features(model, calib, tok.pad_token_id, readout="pre", sae=sae, idx=torch.arange(m, device=device),
                            layer=layer, skip_ids=[tok.bos_token_id])
    opt = make_optimizer(model, r.finetune_lr, 0.1)
    data = batches(seqs, r.finetune_batch, seed)
    fixed = [collate(next(data), tok.pad_token_id, device) for _ in range(4)]
    g = torch.Generator().manual_seed(seed + SEED_SAFETY)  # finetune_cwac's generator of safety picks
    it = {"i": 0}

    def task_batch():
        it["i"] += 1
        return fixed[(it["i"] - 1) % len(fixed)]

    def pick():
        return torch.randint(len(feats.ids), (safety_batch,), generator=g).to(device)

    def sft():  # the package's step with no constraint
        return cwac_step(model, opt, task_batch())

    def cwac():  # the package's step, as finetune_cwac calls it
        return cwac_step(model, opt, task_batch(), subspace=sub, features=feats, lam=LAM, safety_batch=pick())

    return {"recipe": r, "tok": tok, "model": model, "opt": opt, "seqs": seqs, "subspace": sub, "features": feats,
            "sae": sae, "layer": layer, "fixed": fixed, "pick": pick, "sft": sft, "cwac": cwac}


def bench_step(device: str = "cpu", repeats: int = 30, warmup: int = 5, m: int = 100, safety_batch: int = 16,
               task: str = "sentiment", seed: int = 0, layer: int | None = None) -> dict:
    """ms per SFT step and per CWAC step (`step_setup`), with m latents read at the residual after `layer` blocks
    (default: the middle one), and the parts of the CWAC step."""
    setup = step_setup(device, m, safety_batch, task, seed, layer)
    model, sub, feats, sae, pick = setup["model"], setup["subspace"], setup["features"], setup["sae"], setup["pick"]
    layer, r = setup["layer"], setup["recipe"]

    def safety_fwd_bwd():
        feats.loss(model, pick()).backward()
        model.zero_grad(set_to_none=True)

    x_cached = residual(model, feats.ids[pick()], layer).requires_grad_()

    def sae_encode():
        sae.pre_acts(x_cached, feats.idx).sum().backward()

    def projection():
        sub.project_(model)

    model.train()
    res = {"device": str(device), "threads": torch.get_num_threads(), "params": model.num_params(),
           "task_batch": tuple(setup["fixed"][0][0].shape), "safety_batch": (safety_batch, feats.ids.shape[1]), "m": m,
           "layer": layer, "n_layers": r.num_hidden_layers,
           "subspace_k": sum(k for k, _ in sub.ranks().values()),
           **_time({"sft_ms": setup["sft"], "cwac_ms": setup["cwac"], "safety_forward_backward_ms": safety_fwd_bwd,
                    "sae_encode_ms": sae_encode, "projection_ms": projection}, device, repeats, warmup)}
    res["ratio"] = res["cwac_ms"] / res["sft_ms"]
    return res


def bench_step_fsdp(world_size: int = 2, repeats: int = 20, warmup: int = 3, m: int = 100, safety_batch: int = 16,
                    layer: int | None = None) -> dict:
    """The SFT and CWAC steps of the toy setting (`step_setup`) sharded with FSDP2 over `world_size` CPU processes
    (gloo) on this machine, through the package's loop as `finetune` runs it under torchrun. ms per step (rank 0's
    median; every step ends with the ranks in step, since the gradients are reduced across them), and the
    weight-side error ||W S - W0S|| / ||W0S|| on every rank's shards after the timed steps."""
    import json
    import tempfile
    from pathlib import Path

    from ..io import dist
    if world_size < 2:
        raise ValueError(f"--ranks {world_size}: a sharded benchmark needs at least 2 processes")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        dist.run_local(_fsdp_rank, world_size, str(out), repeats, warmup, m, safety_batch, layer)
        return json.loads(out.read_text())


def _fsdp_rank(proc, out: str, repeats: int, warmup: int, m: int, safety_batch: int, layer: int | None) -> None:
    import json
    from pathlib import Path

    from ..io import dist
    setup = step_setup("cpu", m, safety_batch, layer=layer)
    model = dist.shard_model(setup["model"], proc)
    sub, r = setup["subspace"].shard(model), setup["recipe"]
    sch, pad = Schedule(warmup + repeats, r.finetune_batch, r.finetune_lr), setup["tok"].pad_token_id
    res = {"ranks": proc.world_size, "backend": "gloo", "threads": torch.get_num_threads(),
           "params": sum(p.numel() for p in model.parameters()), "m": m, "layer": setup["layer"],
           "sft_ms": _step_ms(model, setup["seqs"], proc, sch, None, pad, warmup),
           "cwac_ms": _step_ms(model, setup["seqs"], proc, sch, Constraints(sub, setup["features"], LAM, safety_batch),
                               pad, warmup)}
    res["ratio"] = res["cwac_ms"] / res["sft_ms"]
    res["ws_error"] = dist.max_over_ranks(sub.ws_error(model))
    if proc.main:
        Path(out).write_text(json.dumps(res))


def _step_ms(model, seqs, proc, schedule, constraints, pad_id: int, warmup: int = 2) -> float:
    """Median ms per step, after `warmup` steps, of the package's own loop in this rank group (`finetune_cwac`
    with `proc`: each rank its part of every global batch)."""
    times = []

    def tick(*_):
        _sync(proc.device)
        times.append(time.perf_counter())

    tick()
    finetune_cwac(model, seqs, schedule, constraints, pad_id=pad_id, proc=proc, on_step=tick, progress=False)
    ms = sorted(1000 * (b - a) for a, b in zip(times[warmup:], times[warmup + 1:]))
    return ms[len(ms) // 2]


def format_step_fsdp(res: dict) -> str:
    return "\n".join([
        f"CWAC step vs SFT step sharded with FSDP2 over {res['ranks']} CPU processes ({res['backend']}, "
        f"{res['threads']} thread(s) each), toy model {res['params'] / 1e6:.2f}M params, {res['m']} latents after "
        f"block {res['layer']}; each rank takes 1/{res['ranks']} of the same global batch",
        "| part | ms |", "|---|---|",
        f"| SFT step | {res['sft_ms']:.2f} |",
        f"| CWAC step | {res['cwac_ms']:.2f} |",
        f"| ratio CWAC / SFT | {res['ratio']:.2f} |",
        f"| weight-side error: max over every rank's shards of norm(W S - W0S) / norm(W0S), after the timed steps | "
        f"{res['ws_error']:.1e} |"])


def bench_sharded(proc, shape: str = "tiny", steps: int = 10, batch: int | None = None, seq: int | None = None,
                  m: int = 100, rank_frac: float = 0.5, checkpointing: bool = False) -> dict:
    """A short sharded fine-tune of a random model of `shape` in this torchrun process group: `steps` SFT steps, then
    `steps` CWAC steps (S a random orthonormal basis of rank_frac x in per down_proj, W0S = W S; m latents of a
    random SAE in the middle), through `finetune_cwac` as `finetune` runs it. bf16-mixed on GPUs, fp32 on CPU;
    `batch` sequences of `seq` tokens per rank. Returns ms per step (the median after 2 warm-up steps), the peak
    GPU memory (the largest over the ranks) against `plan`'s figure, and the weight-side error on every rank's
    shards."""
    from ..io import dist
    from ..core.subspace import Subspace, target_names
    from .plan import plan, rank_k
    cuda = proc.device.type == "cuda"
    dtype, batch, seq = "bf16-mixed" if cuda else "fp32", batch or (8 if cuda else 2), seq or (2048 if cuda else 64)
    if steps < 3:
        raise ValueError(f"--repeats {steps}: the sharded benchmark needs at least 3 steps (2 are warm-up)")
    cfg = Config(**SHAPES[shape])
    with torch.device("meta"):
        model = GPT(cfg, device="meta")
    dist.shard_model(model, proc, dtype)
    model.to_empty(device=proc.device)
    g = torch.Generator(proc.device).manual_seed(proc.rank)  # random weights: the timings do not depend on them
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_(0, cfg.initializer_range, generator=g) if p.dim() > 1 else p.to_local().fill_(1.0)
    model.gradient_checkpointing = checkpointing
    cpu = torch.Generator().manual_seed(0)  # the same S, prompts and data on every rank
    S, W0S = {}, {}
    for n in target_names(model):
        W = model.get_submodule(n).weight
        S[n] = torch.linalg.qr(torch.randn(W.shape[1], rank_k(rank_frac, W.shape[1]), generator=cpu).to(
            proc.device))[0]
        W0S[n] = W.detach().full_tensor() @ S[n]
    sub = Subspace(S, W0S).shard(model)
    layer = cfg.num_hidden_layers // 2
    sae = SAE(SAEConfig(cfg.hidden_size, 8 * cfg.hidden_size, 32, layer), device=proc.device)
    prompts = torch.randint(3, cfg.vocab_size, (32, 64), generator=cpu).tolist()
    feats = safety_features(model, prompts, 0, readout="pre", sae=sae, idx=torch.arange(m, device=proc.device),
                            layer=layer)
    seqs = [(torch.randint(3, cfg.vocab_size, (seq,), generator=cpu).tolist(), [1] * seq)
            for _ in range(batch * proc.world_size * steps)]
    res = {"shape": shape, "ranks": proc.world_size, "device": str(proc.device.type), "dtype": dtype,
           "params": sum(p.numel() for p in model.parameters()), "batch_per_rank": batch, "seq": seq, "m": m,
           "checkpointing": checkpointing, "subspace_k": sum(s.shape[1] for s in S.values())}
    for name, constraints in (("sft", None), ("cwac", Constraints(sub, feats, LAM, 16))):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        res[f"{name}_ms"] = _step_ms(model, seqs, proc, Schedule(steps, batch * proc.world_size, 1e-5), constraints, 0)
        res[f"{name}_peak_gb"] = dist.max_over_ranks(torch.cuda.max_memory_allocated() / 1e9) if cuda else None
        res[f"{name}_plan_gb"] = plan(cfg, proc.world_size, method=name, batch_size=batch, seq_len=seq, dtype=dtype,
                                      rank_frac=rank_frac, checkpointing=checkpointing)["gpu_bytes"] / 1e9
    res["ratio"] = res["cwac_ms"] / res["sft_ms"]
    res["tokens_per_s"] = batch * proc.world_size * seq / (res["cwac_ms"] / 1000)
    res["ws_error"] = dist.max_over_ranks(sub.ws_error(model))
    return res


def format_sharded(res: dict) -> str:
    def peak(name):
        if res[f"{name}_peak_gb"] is None:
            return f"- (CPU) | {res[f'{name}_plan_gb']:.1f}"
        return f"{res[f'{name}_peak_gb']:.1f} | {res[f'{name}_plan_gb']:.1f}"
    return "\n".join([
        f"A sharded fine-tune of a random {res['shape']} model ({res['params'] / 1e9:.2f} B params) with FSDP2 on "
        f"{res['ranks']} {res['device']} rank(s), {res['dtype']}, {res['batch_per_rank']} x {res['seq']} tokens per "
        f"rank, checkpointing {'on' if res['checkpointing'] else 'off'}; CWAC: {res['m']} latents, subspace k = "
        f"{res['subspace_k']} over the down_proj",
        "| step | ms | peak GPU GB (largest rank) | `plan` GB |", "|---|---|---|---|",
        f"| SFT | {res['sft_ms']:.1f} | {peak('sft')} |",
        f"| CWAC | {res['cwac_ms']:.1f} | {peak('cwac')} |",
        f"ratio CWAC / SFT {res['ratio']:.2f}; {res['tokens_per_s']:.0f} tokens/s (CWAC); weight-side error (max "
        f"over every rank's shards of norm(W S - W0S) / norm(W0S)) {res['ws_error']:.1e}"])


def format_step(res: dict) -> str:
    return "\n".join([
        f"CWAC step vs SFT step on {res['device']} ({res['threads']} threads), toy model {res['params'] / 1e6:.2f}M "
        f"params, task batch {res['task_batch']}, safety batch {res['safety_batch']}, {res['m']} latents after "
        f"block {res['layer']} of {res['n_layers']}, "
        f"subspace k = {res['subspace_k']} over 4 down_proj",
        "| part | ms |", "|---|---|",
        f"| SFT step | {res['sft_ms']:.2f} |",
        f"| CWAC step | {res['cwac_ms']:.2f} |",
        f"| - L_safety forward + backward (blocks up to the SAE layer, encode) | {res['safety_forward_backward_ms']:.2f} |",
        f"|   - of which the SAE encode of the selected latents (+ backward) | {res['sae_encode_ms']:.2f} |",
        f"| - projection W <- W - (W S - W0S) S^T | {res['projection_ms']:.2f} |",
        f"| ratio CWAC / SFT | {res['ratio']:.2f} (goal <= 1.30) |"])


# ---------------------------------------------------------------- model: minicwac vs transformers on real shapes

BENCH_SHAPES = ("tiny", "llama-1b", "llama-8b")  # the shapes `bench` times (`plan.SHAPES`)
# dense bf16 peak FLOP/s by device name (no sparsity), for MFU
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def step_flops(cfg, tokens: int, seq: int) -> float:
    """6 N per token for the matrices (forward + backward) + 12 L d T for attention scores (PaLM's count)."""
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    hd = cfg.head_dim
    per_layer = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 3 * d * cfg.intermediate_size
    n = L * per_layer + d * cfg.vocab_size  # + lm_head; the embedding lookup is not a matmul
    return tokens * (6 * n + 12 * L * d * seq)


def peak_flops(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _sft_step_fn(model, opt, ids, loss_fn):  # transformers' model: the same four lines as the package's SFT step
    def step():
        loss_fn(model, ids).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_model(shape: str = "tiny", device: str = "cpu", dtype: str | None = None, batch: int | None = None,
                seq: int | None = None, repeats: int = 10, warmup: int = 3, compile: bool = False,
                hf: bool = True, m: int = 100, safety_batch: int = 16, safety_len: int = 32,
                calib_prompts: int = 256) -> dict:
    """minicwac's SFT step against transformers' LlamaForCausalLM on the same shape, and the CWAC step against the
    SFT step (safety prompts of `safety_len` tokens, forward stopped at the SAE layer, only `m` latents encoded),
    plus the subspace extraction time (every down_proj, `calib_prompts` prompts, energy 0.99).

    Defaults: on CUDA bf16, B=8 x T=1024; on CPU float32, B=4 x T=256."""
    if shape not in BENCH_SHAPES:
        raise ValueError(f"shape={shape!r}, expected one of {sorted(BENCH_SHAPES)}")
    cuda = torch.device(device).type == "cuda"
    dt = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          None: torch.bfloat16 if cuda else torch.float32}.get(dtype)
    if dt is None:
        raise ValueError(f"dtype={dtype!r}, expected bf16 or fp32")
    B, T = batch or (8 if cuda else 4), seq or (1024 if cuda else 256)
    cfg = Config(**SHAPES[shape])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(cfg.vocab_size, (B, T), generator=g).to(device)
    res = {"shape": shape, "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""),
           "dtype": str(dt).removeprefix("torch."), "batch": B, "seq": T, "compile": compile, "rows": {},
           "optimizer": "fused AdamW" if cuda else "AdamW (foreach)"}
    flops, peak = step_flops(cfg, B * T, T), peak_flops(device)

    def record(name, ms):
        res["rows"][name] = {"ms": ms, "tokens_s": B * T / ms * 1000,
                             "mfu": None if peak is None else flops / (ms / 1000) / peak}

    def fused_adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=cuda or None)

    # --- minicwac: SFT and CWAC in the same loop
    torch.manual_seed(0)
    model = GPT(cfg, device=device, dtype=dt).train()
    res["params"] = model.num_params()
    calib = torch.randint(cfg.vocab_size, (calib_prompts, safety_len), generator=g).tolist()
    _sync(device)
    t = time.perf_counter()
    sub = compute_subspace(model, calib, pad_id=0)  # equal lengths: no padding
    _sync(device)
    res["subspace_s"] = time.perf_counter() - t
    res["subspace_k"] = {n: k for n, (k, _) in list(sub.ranks().items())[:1]}
    layer = cfg.num_hidden_layers // 2
    sae = SAE(SAEConfig(cfg.hidden_size, 8 * cfg.hidden_size, 64, layer), device=device)
    feats = safety_features(model, calib, 0, readout="pre", sae=sae, idx=torch.arange(m, device=device), layer=layer)
    if compile:
        model.compile()  # in place: the module names (and so the subspace and the hooks) stay the same
    fwd = model
    opt = fused_adamw(model)
    labels = ids  # every token trained, as transformers' labels=ids

    def sft():
        cwac_step(fwd, opt, (ids, labels))

    def cwac():
        pick = torch.randint(len(feats.ids), (safety_batch,), generator=g).to(device)
        cwac_step(fwd, opt, (ids, labels), subspace=sub, features=feats, lam=LAM, safety_batch=pick)

    times = _time({"minicwac SFT": sft, "minicwac CWAC": cwac}, device, repeats, warmup)
    for k, v in times.items():
        record(k, v)
    if cuda:
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, opt, fwd, sft, feats, sub, sae
    if cuda:
        torch.cuda.empty_cache()

    if hf:  # transformers' LlamaForCausalLM, same shape (an independent implementation; optional)
        ms = _transformers_sft_ms(shape, device, dt, ids, compile, repeats, warmup, fused_adamw)
        if isinstance(ms, str):
            res["hf_skipped"] = ms
        else:
            record("transformers SFT", ms)
    rows = res["rows"]
    res["cwac_over_sft"] = rows["minicwac CWAC"]["ms"] / rows["minicwac SFT"]["ms"]
    if "transformers SFT" in rows:
        res["minicwac_speedup_vs_hf"] = rows["transformers SFT"]["ms"] / rows["minicwac SFT"]["ms"]
    return res


def _transformers_sft_ms(shape: str, device, dt, ids, compile: bool, repeats: int, warmup: int, optimizer):
    """Median ms of transformers' SFT step on the same shape and batch, or why it was skipped."""
    try:
        import transformers
    except ImportError:
        return "transformers is not installed (pip install transformers)"
    hcfg = transformers.LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        ref = transformers.LlamaForCausalLM(hcfg).to(dt).train()
    ref.config.use_cache = False
    fwd = torch.compile(ref) if compile else ref
    step = _sft_step_fn(fwd, optimizer(ref), ids, lambda mdl, x: mdl(input_ids=x, labels=x).loss)
    return _time({"hf": step}, device, repeats, warmup)["hf"]


def format_model(res: dict) -> str:
    lines = [f"{res['shape']} ({res['params'] / 1e6:.1f}M params) on {res['device']}, {res['dtype']}, "
             f"B={res['batch']} x T={res['seq']}, {'compiled' if res['compile'] else 'eager'}, {res['optimizer']}",
             "| step | ms | tokens/s | MFU |", "|---|---|---|---|"]
    for name, r in res["rows"].items():
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {name} | {r['ms']:.1f} | {r['tokens_s']:.0f} | {mfu} |")
    lines.append(f"CWAC / SFT: {res['cwac_over_sft']:.2f} (goal <= 1.10)")
    if "minicwac_speedup_vs_hf" in res:
        lines.append(f"transformers / minicwac step time: {res['minicwac_speedup_vs_hf']:.2f} (goal >= 1.00)")
    elif "hf_skipped" in res:
        lines.append(f"transformers: skipped ({res['hf_skipped']})")
    lines.append(f"subspace extraction (every down_proj, energy 0.99): {res['subspace_s']:.1f} s")
    if "peak_mem_gb" in res:
        lines.append(f"peak GPU memory (minicwac SFT + CWAC): {res['peak_mem_gb']:.1f} GiB")
    return "\n".join(lines)


# ---------------------------------------------------------------- python -m minicwac bench


def add_arguments(p) -> None:
    from ..cli import positive_int
    p.add_argument("--what", required=True, choices=["step", "model", "sharded"],
                   help="step: CWAC step / SFT step on the toy model; model: minicwac vs transformers on a real shape; "
                        "sharded (under torchrun): a short FSDP2 fine-tune of a random model of --shape")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed steps (default: step 30, model 10)")
    p.add_argument("--m", type=positive_int, default=None, help="safety latents (--what step; default 100)")
    p.add_argument("--fsdp", action="store_true",
                   help="--what step: the sharded step, FSDP2 over --ranks CPU processes (gloo) started here")
    p.add_argument("--ranks", type=positive_int, default=2, help="processes for --fsdp (default 2)")
    p.add_argument("--sae-layer", type=positive_int, default=None,
                   help="SAE after this many blocks (--what step; default: the middle one)")
    p.add_argument("--shape", default="tiny", choices=BENCH_SHAPES, help="model shape (--what model, sharded)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="default: 8 on cuda, 4 on cpu (--what sharded: per rank, 8 on cuda, 2 on cpu)")
    p.add_argument("--seq", type=positive_int, default=None,
                   help="default: 1024 on cuda, 256 on cpu (--what sharded: 2048 on cuda, 64 on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (--what model)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--checkpointing", action="store_true", help="--what sharded: activation checkpointing")
    p.add_argument("--json", default=None, help="--what sharded: also write the figures to this file")


def run(args) -> None:
    if args.what == "model" and (args.m is not None or args.sae_layer is not None or args.fsdp):
        raise ValueError("--m, --sae-layer and --fsdp apply to --what step only")
    if args.fsdp and args.device != "cpu":
        raise ValueError("bench --fsdp starts its CPU processes itself; on GPUs run finetune under torchrun")
    if args.what == "step" and args.fsdp:
        print(format_step_fsdp(bench_step_fsdp(args.ranks, args.repeats or 20, m=args.m or 100,
                                               layer=args.sae_layer)))
    elif args.what == "sharded":
        run_sharded(args)
    elif args.what == "step":
        print(format_step(bench_step(args.device, args.repeats or 30, m=args.m or 100, layer=args.sae_layer)))
    else:
        print(format_model(bench_model(args.shape, args.device, args.dtype, args.batch, args.seq, args.repeats or 10,
                                       compile=args.compile, hf=not args.no_hf)))


def run_sharded(args) -> None:
    """`bench --what sharded` in each torchrun process; rank 0 prints (and writes --json)."""
    from pathlib import Path

    from ..core.files import write_json_atomic
    from ..io import dist
    if not dist.launched():
        raise ValueError("bench --what sharded runs in a process group: start it with torchrun --nproc_per_node N "
                         "-m minicwac bench --what sharded ...")
    proc = dist.init(args.device)
    try:
        res = bench_sharded(proc, args.shape, args.repeats or 10, args.batch, args.seq, args.m or 100,
                            checkpointing=args.checkpointing)
        dist.barrier()  # every rank done before any leaves the process group
    finally:
        dist.close()
    if proc.main:
        print(format_sharded(res))
        if args.json:
            write_json_atomic(Path(args.json), res)
            print(f"wrote {args.json}")

