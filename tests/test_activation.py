"""The activation side of the CWAC step, seen where it acts: away from the aligned weights.

At the aligned weights z = z0, so L_safety and its gradient are zero and a step checked there cannot tell lambda
from 1, the sampled safety batch from all prompts, or a fresh pick from a stale one. These tests start from a
drifted model and use plain SGD (its update is -lr g, so lambda's share of g shows in the weights).
"""
from __future__ import annotations

import pytest
import torch
from test_cwac import copy_of, make, task_seqs, harmful

from minicwac.core.cwac import Constraints, Schedule, cwac_step, finetune_cwac
from minicwac.core.data import batches, collate, lm_loss
from minicwac.core.features import safety_features
from minicwac.core.sae import SAE, SAEConfig
from minicwac.core.settings import SEED_SAFETY
from minicwac.core.subspace import compute_subspace


def features(model, layer=1):
    torch.manual_seed(2)
    sae = SAE(SAEConfig(32, 64, 4, layer=layer))
    with torch.no_grad():
        sae.b_enc.fill_(0.2)  # most latents active: a dense readout
    return safety_features(model, harmful(), 0, readout="pre", sae=sae, idx=torch.arange(10))


def drifted(model, scale=0.05, seed=9):
    """A copy of `model` with every weight moved a little: z != z0 there."""
    m = copy_of(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def safety_by_hand(model, feats, pick):
    """L_safety on the prompts `pick`: the SAE's pre-TopK values of the chosen latents at its layer, their squared
    distance to z0 summed over the latents, averaged over the kept tokens."""
    x = model(feats.ids[pick], stop_at_layer=feats.layer)  # (B, T, hidden)
    z = feats.sae.pre_acts(x, feats.idx)  # (B, T, m)
    return ((z - feats.z0[pick]) ** 2).sum(-1)[feats.keep[pick]].mean()


def test_one_sgd_step_from_a_drifted_model_is_minus_lr_times_task_plus_lam_safety_on_the_pick():
    aligned = make()
    feats = features(aligned)
    start = drifted(aligned)
    batch = collate(next(batches(task_seqs(), 4, 3)), 0)
    pick = torch.tensor([1, 4, 4, 7])  # a repeated prompt counts twice, as randint may draw it
    lr, lam = 0.1, 3.0

    hand = copy_of(start).train()
    params = list(hand.parameters())
    task = lm_loss(hand, *batch)
    safety = safety_by_hand(hand, feats, pick)
    g_task = torch.autograd.grad(task, params, retain_graph=True)
    g_safe = torch.autograd.grad(safety, params, allow_unused=True)
    g_safe = [torch.zeros_like(p) if g is None else g for g, p in zip(g_safe, params)]
    expected = [p.detach() - lr * (gt + lam * gs) for p, gt, gs in zip(params, g_task, g_safe)]

    safety, task = safety.detach(), task.detach()
    pkg = copy_of(start).train()
    out = cwac_step(pkg, torch.optim.SGD(pkg.parameters(), lr=lr), batch, features=feats, lam=lam,
                    safety_batch=pick, grad_clip=1e9)

    assert float(safety) > 1e-3, "the drifted model should be away from z0 (else this test sees nothing)"
    with torch.no_grad():
        on_all = float(safety_by_hand(copy_of(start), feats, torch.arange(len(feats.ids))))
    assert abs(on_all - float(safety)) > 1e-3 * float(safety), "the pick should differ from all prompts here"
    assert abs(out["safety"] - float(safety)) <= 1e-5 * float(safety), \
        f"reported L_safety {out['safety']} is not L_safety on the pick ({float(safety)}; on every prompt: {on_all})"
    assert abs(out["task"] - float(task)) <= 1e-6 * float(task)
    total = float(task + lam * safety)
    assert abs(out["loss"] - total) <= 1e-5 * total, "the reported loss should be task + lam * safety"
    lam_share = max(float((lr * lam * gs).abs().max()) for gs in g_safe)
    assert lam_share > 1e-3, "lambda's part of the step should be visible in the weights"
    for (name, p), e in zip(pkg.named_parameters(), expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: (
            f"{name} after one SGD step differs from -lr (grad task + lam grad L_safety(pick)) ({m}). Probably: "
            "lambda not applied, L_safety on other prompts than the pick, or the safety term left out"))


def test_the_safety_picks_follow_their_own_generator_and_change_every_step(monkeypatch):
    aligned = make()
    feats = features(aligned)
    seen = []
    original = type(feats).loss

    def spy(self, model, batch=None, n_tokens=None):
        seen.append(None if batch is None else batch.clone())
        return original(self, model, batch, n_tokens)

    monkeypatch.setattr(type(feats), "loss", spy)
    steps, sb, seed = 4, 3, 11
    finetune_cwac(drifted(aligned), task_seqs(), Schedule(steps, 4, 1e-3, seed=seed), Constraints(None, feats, 0.5, sb),
                  pad_id=0, progress=False)
    g = torch.Generator().manual_seed(seed + SEED_SAFETY)
    want = [torch.randint(len(feats.ids), (sb,), generator=g) for _ in range(steps)]
    assert len(seen) == steps and all(s is not None for s in seen), "one safety batch per step, never all prompts"
    for i, (got, w) in enumerate(zip(seen, want)):
        assert torch.equal(got, w), f"step {i}: safety batch {got.tolist()}, expected {w.tolist()} from its generator"
    assert len({tuple(s.tolist()) for s in seen}) > 1, "the safety batch should change from step to step"


def test_lam_zero_runs_no_safety_forward_and_lam_scales_the_step():
    aligned = make()
    feats = features(aligned)
    start = drifted(aligned)
    batch = collate(next(batches(task_seqs(), 4, 3)), 0)
    pick = torch.arange(5)
    moved = {}
    for lam in (0.0, 1.0, 2.0):
        m = copy_of(start).train()
        before = [p.detach().clone() for p in m.parameters()]
        out = cwac_step(m, torch.optim.SGD(m.parameters(), lr=0.1), batch, features=feats, lam=lam,
                        safety_batch=pick, grad_clip=1e9)
        moved[lam] = torch.cat([(p.detach() - b).flatten() for p, b in zip(m.parameters(), before)])
        if lam == 0:
            assert out["safety"] == 0.0, "lam = 0: no L_safety forward, none reported"
    # SGD is linear in the gradient: the safety part of the step doubles with lambda
    torch.testing.assert_close(moved[2.0] - moved[0.0], 2 * (moved[1.0] - moved[0.0]), atol=1e-6, rtol=1e-4,
                               msg="the safety term's part of the update should scale with lambda")
    assert float((moved[1.0] - moved[0.0]).abs().max()) > 1e-4


def test_l_safety_is_zero_at_the_aligned_weights_under_bf16_mixed():
    """z0 is read in float32; the training step under bf16 autocast must read z the same way, or L_safety starts
    at a rounding floor whose gradient is noise."""
    aligned = make()
    feats = features(aligned)
    pick = torch.arange(len(feats.ids))
    model = copy_of(aligned).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = float(feats.loss(model, pick).detach())
    scale = float((feats.z0[feats.keep] ** 2).sum(-1).mean())
    assert inside <= 1e-12 * scale, \
        f"L_safety at the aligned weights under bf16 autocast: {inside:.2e} (|z0|^2 {scale:.2e})"
    hist = finetune_cwac(copy_of(aligned), task_seqs(), Schedule(1, 4, 1e-3, seed=0), Constraints(None, feats, 0.5, 4),
                         pad_id=0, autocast_dtype=torch.bfloat16, progress=False)
    assert hist["safety"][0] <= 1e-12 * scale, "a bf16-mixed run should start with L_safety = 0"


def test_l_safety_reads_the_model_without_dropout():
    """z0 is read in eval mode; a model training in train mode with dropout must not see dropout in L_safety."""
    transformers = pytest.importorskip("transformers", reason="a transformers model with dropout")
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attention_dropout=0.5)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"  # eager attention applies attention_dropout in train mode
    feats = features(model)
    model.train()
    torch.manual_seed(1)
    assert float(feats.loss(model).detach()) <= 1e-10, "dropout reached L_safety: read z in eval mode, as z0 was"
    assert model.training and all(m.training for m in model.modules()), "the model's train mode should be restored"


def test_the_core_warns_about_low_precision_constrained_weights():
    aligned = make()
    sub = compute_subspace(aligned, harmful(), pad_id=0, energy=0.9)
    model = copy_of(aligned).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="bf16-mixed"):
        finetune_cwac(model, task_seqs(), Schedule(1, 4, 1e-3, seed=0), Constraints(sub, None, 0.0, 1), pad_id=0,
                      progress=False)
