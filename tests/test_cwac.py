"""minicwac.cwac: one CWAC step against a hand computation (AdamW written out), the switches, and the baselines."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from minicwac.core.baselines import AsFTPenalty, alignment_projectors, safeinstr_mix, safelora_project_
from minicwac.core.cwac import Constraints, Schedule, finetune_cwac
from minicwac.core.features import safety_features
from minicwac.io.model import GPT
from minicwac.core.sae import SAE, SAEConfig
from minicwac.core.subspace import ALL_LINEARS, compute_subspace
from minicwac.core.data import batches, collate, lm_loss


def make(seed=0):
    torch.manual_seed(seed)
    return GPT(tiny_config()).eval()


def copy_of(model):
    m = GPT(model.config)
    m.load_state_dict(model.state_dict())
    return m.eval()


def task_seqs(n=12, T=9):
    g = torch.Generator().manual_seed(5)
    return [(torch.randint(3, 97, (T,), generator=g).tolist(), [0] * 3 + [1] * (T - 3)) for _ in range(n)]


def harmful(n=10):
    g = torch.Generator().manual_seed(6)
    return [torch.randint(3, 97, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture
def parts():
    model = make()
    sub = compute_subspace(model, harmful(), pad_id=0, energy=0.9)
    torch.manual_seed(2)
    sae = SAE(SAEConfig(32, 64, 4, layer=1))
    with torch.no_grad():
        sae.b_enc.fill_(0.2)
    feats = safety_features(model, harmful(), 0, readout="pre", sae=sae, idx=torch.arange(10))
    return model, sub, feats


def test_one_cwac_step_equals_a_hand_computation(parts):
    """First AdamW step by hand: the target gradients projected, g <- g - (g S) S^T; m = (1-b1) g, v = (1-b2) g^2,
    bias-corrected -> g / (|g| + eps); decoupled weight decay on matrices; then W <- W - (W S - W0S) S^T."""
    model, sub, feats = parts
    lr, wd, lam, eps, seed, sb = 1e-2, 0.1, 0.5, 1e-8, 3, 4
    pkg = copy_of(model)
    finetune_cwac(pkg, task_seqs(), Schedule(1, 4, lr, wd, warmup=1, grad_clip=1e9, seed=seed),
                  Constraints(sub, feats, lam, sb), progress=False)

    hand = copy_of(model).train()
    ids, labels = collate(next(batches(task_seqs(), 4, seed)), 0)
    pick = torch.randint(len(feats.ids), (sb,), generator=torch.Generator().manual_seed(seed + 7))
    x = hand(feats.ids[pick], stop_at_layer=1)
    z = feats.sae.pre_acts(x, feats.idx)
    keep = feats.keep[pick]
    safety = ((z - feats.z0[pick]) ** 2).sum(-1)[keep].mean()
    (lm_loss(hand, ids, labels) + lam * safety).backward()
    with torch.no_grad():
        mods = dict(hand.named_modules())
        for name, S in sub.S.items():
            G = mods[name].weight.grad
            G.sub_((G @ S) @ S.T)
        for name, p in hand.named_parameters():
            g = p.grad
            step = g / (g.abs() + eps)  # m_hat / (sqrt(v_hat) + eps) at step 1
            decay = wd if p.dim() >= 2 else 0.0
            p.mul_(1 - lr * decay).sub_(lr * step)
        mods = dict(hand.named_modules())
        for name, S in sub.S.items():
            W = mods[name].weight
            W.sub_((W @ S - sub.W0S[name]) @ S.T)
    for (name, a), b in zip(pkg.named_parameters(), hand.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=f"{name} differs from the hand-computed step")


def test_switches_give_sft_weight_activation_cwac(parts):
    """With no constraint the run equals plain SFT; lam = 0 turns the activation side off; the weight side holds
    W S = W0 S; the activation side lowers L_safety relative to SFT on the same data."""
    model, sub, feats = parts
    runs = {}
    for name, c in {"sft": None, "lam0": Constraints(None, feats, 0.0, 16), "weight": Constraints(sub, None, 0.5, 16),
                    "activation": Constraints(None, feats, 5.0, 16)}.items():
        m = copy_of(model)
        h = finetune_cwac(m, task_seqs(), Schedule(15, 4, 3e-3, seed=1), c, progress=False)
        runs[name] = (m, h)
    for a, b in zip(runs["sft"][0].parameters(), runs["lam0"][0].parameters()):
        assert torch.equal(a, b)
    w = dict(runs["weight"][0].named_modules())
    for n, S in sub.S.items():
        torch.testing.assert_close(w[n].weight @ S, sub.W0S[n], atol=1e-5, rtol=0)
    with torch.no_grad():
        assert feats.loss(runs["activation"][0]) < feats.loss(runs["sft"][0])
    assert set(runs["sft"][1]) >= {"step", "loss", "task", "safety", "lr", "curve"}
    assert runs["activation"][1]["safety"][0] == pytest.approx(0.0, abs=1e-9)  # z0 came from this very model


def test_drift_curve_and_argument_checks(parts):
    model, _, _ = parts
    calls = []
    h = finetune_cwac(copy_of(model), task_seqs(), Schedule(6, 4),
                      curve=(3, lambda m: calls.append(1) or {"hs": float(len(calls))}), progress=False)
    assert [c["step"] for c in h["curve"]] == [0, 3, 6] and [c["hs"] for c in h["curve"]] == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="lam"):
        finetune_cwac(copy_of(model), task_seqs(), Schedule(1), Constraints(None, None, -1.0, 16), progress=False)
    with pytest.raises(ValueError, match="steps"):
        finetune_cwac(copy_of(model), task_seqs(), Schedule(0), progress=False)


def test_safeinstr_mix_counts():
    seqs = [([i], [1]) for i in range(100)]
    refusals = [([1000 + i], [1]) for i in range(5)]
    mixed = safeinstr_mix(seqs, refusals, 0.1, seed=0)
    assert len(mixed) == 100 and sum(s[0][0] >= 1000 for s in mixed) == 10
    assert safeinstr_mix(seqs, refusals, 0.0) and len(safeinstr_mix(seqs, refusals, 0.0)) == 100
    with pytest.raises(ValueError, match="frac"):
        safeinstr_mix(seqs, refusals, 1.0)


def test_asft_and_safelora_by_hand():
    base, aligned = make(0), make(1)
    C = alignment_projectors(base, aligned, [r"model\.layers\.0\.mlp\.down_proj"])
    name = "model.layers.0.mlp.down_proj"
    V = aligned.model.layers[0].mlp.down_proj.weight - base.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(C[name], V @ V.T / V.norm())
    tuned = copy_of(aligned)
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight.add_(0.01 * torch.randn(32, 64))
    dW = tuned.model.layers[0].mlp.down_proj.weight - aligned.model.layers[0].mlp.down_proj.weight
    pen = AsFTPenalty(aligned, C, lam=2.0)
    assert pen(tuned).item() == pytest.approx(2.0 * ((dW - C[name] @ dW) ** 2).sum().item(), rel=1e-5)
    assert pen(aligned).item() == 0.0
    P = C[name] @ dW
    cos = ((P * dW).sum() / (P.norm() * dW.norm())).item()
    untouched = copy_of(tuned)
    got = safelora_project_(untouched, aligned, C, threshold=-1.0)  # below no threshold: nothing changes
    assert got[name] == pytest.approx(cos, rel=1e-5)
    for (n, a), b in zip(untouched.state_dict().items(), tuned.state_dict().values()):
        assert torch.equal(a, b), n
    projected = copy_of(tuned)
    safelora_project_(projected, aligned, C, threshold=cos + 0.01)
    torch.testing.assert_close(projected.model.layers[0].mlp.down_proj.weight,
                               aligned.model.layers[0].mlp.down_proj.weight + P)
    assert len(alignment_projectors(base, aligned, ALL_LINEARS)) == 14


FAMILY_CONFIGS = {  # tiny configs of every family the loader supports, with the switches that matter on
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": dict(sliding_window=4),
    "qwen2": dict(),
    "gemma2": dict(sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=10.0, head_dim=16,
                   hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
    "gpt2": dict(hidden_act="gelu_new", num_key_value_heads=4, tie_word_embeddings=True),
}


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cwac_runs_the_same_math_on_every_family(model_type, dtype):
    """Subspace, SAE features and the CWAC loop on each family's architecture (bf16 parameters too): after the
    fine-tune (W - W0) S = 0 up to the parameters' rounding, the targets' biases are untouched (GPT-2, whose
    down_proj has one), and L_safety starts at ~0."""
    cfg = tiny_config(model_type=model_type, num_attention_heads=4, **FAMILY_CONFIGS[model_type])
    torch.manual_seed(0)
    model = GPT(cfg).to(dtype).eval()
    ref = GPT(cfg).to(dtype)
    ref.load_state_dict(model.state_dict())
    sub = compute_subspace(model, harmful(), pad_id=0, energy=0.9)
    sae = SAE(SAEConfig(cfg.hidden_size, 64, 4, layer=1))
    feats = safety_features(model, harmful(), 0, readout="pre", sae=sae, idx=torch.arange(10))
    with torch.no_grad():
        assert float(feats.loss(model)) < 1e-3  # z = z0 at the aligned weights
    biases = {n: b.detach().clone() for n, b in zip(sub.S, sub.biases(model))}
    hist = finetune_cwac(model, task_seqs(), Schedule(4, 4, 1e-2), Constraints(sub, feats, 0.5, 16), progress=False)
    assert all(torch.isfinite(torch.tensor(hist["loss"])))
    mods, ref_mods = dict(model.named_modules()), dict(ref.named_modules())
    for name, S in sub.S.items():
        W, W0 = mods[name].weight.detach().float(), ref_mods[name].weight.detach().float()
        assert (W - W0).norm() > 0, f"{name} did not train"
        # exact in float32; in bf16 the projected weights are rounded back to bf16 (relative 2^-8 per entry)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert float(((W - W0) @ S).norm() / W0.norm()) < tol
    assert (len(biases) > 0) == (model_type == "gpt2")
    for (name, b0), b in zip(biases.items(), sub.biases(model)):
        assert torch.equal(b, b0) and b.requires_grad, f"{name}.bias changed or was left frozen"


# ---------------------------------------------------------------- bugs found in review, one test each


def test_clip_norm_counts_only_the_applied_gradient(parts):
    """With the update projection, the in-subspace part of g is discarded: it must not count in the clip norm.
    Under plain SGD (lr 1) the step of a parameter outside the targets is then -g * clip / ||P g||."""
    from minicwac.core.cwac import cwac_step
    model, sub, _ = parts
    m = copy_of(model).train()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    batch = collate(task_seqs()[:4], 0)
    ref = copy_of(model).train()
    lm_loss(ref, *batch).backward()
    mods = dict(ref.named_modules())
    for name, S in sub.S.items():
        G = mods[name].weight.grad
        G.sub_((G @ S) @ S.T)
    applied = torch.sqrt(sum((p.grad ** 2).sum() for p in ref.parameters()))
    clip = float(applied) / 10  # binds
    before = m.model.embed_tokens.weight.detach().clone()
    cwac_step(m, opt, batch, subspace=sub, grad_clip=clip)
    want = -ref.model.embed_tokens.weight.grad * clip / applied
    torch.testing.assert_close(m.model.embed_tokens.weight.detach() - before, want, atol=1e-7, rtol=1e-4)


def test_the_sae_is_frozen_and_gathers_no_gradient(parts):
    model, _, feats = parts
    assert not any(p.requires_grad for p in feats.sae.parameters())
    finetune_cwac(copy_of(model), task_seqs(), Schedule(2, 4), Constraints(None, feats, 1.0, 4), progress=False)
    assert all(p.grad is None for p in feats.sae.parameters())


def test_frozen_biases_are_restored_when_training_raises():
    torch.manual_seed(0)
    model = GPT(tiny_config(model_type="qwen2")).eval()  # q/k/v projections have biases
    sub = compute_subspace(model, [[5, 6, 7, 8]] * 4, pad_id=0, patterns=ALL_LINEARS, energy=0.9)
    biases = sub.biases(model)
    assert biases and all(b.requires_grad for b in biases)

    calls = []

    def fails_after_a_step(m):  # step 0 evaluates fine, the evaluation after step 1 raises
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("evaluation failed")
        return {"hs": 0.0}

    with pytest.raises(RuntimeError, match="evaluation failed"):
        finetune_cwac(model, task_seqs(), Schedule(3, 4), Constraints(sub, None, 0.5, 16),
                      curve=(1, fails_after_a_step), progress=False)
    assert all(b.requires_grad for b in biases), "a failed run left the target biases frozen"


def test_safeinstr_adds_in_the_authors_form():
    seqs = [([i], [1]) for i in range(100)]
    refusals = [([1000 + i], [1]) for i in range(5)]
    added = safeinstr_mix(seqs, refusals, 0.1, seed=0, mode="add")
    assert len(added) == 110 and sum(s[0][0] >= 1000 for s in added) == 10
    assert sorted(s[0][0] for s in added if s[0][0] < 1000) == list(range(100))  # every task example kept
    with pytest.raises(ValueError, match="mode='both'"):
        safeinstr_mix(seqs, refusals, 0.1, mode="both")


def test_safelora_number_mode_projects_the_lowest_cosines():
    """n_project=1 projects the one target of lowest cos(C dW, dW), whatever the threshold; 0 projects none."""
    base, aligned = make(0), make(1)
    C = alignment_projectors(base, aligned, [r"model\.layers\.\d\.mlp\.down_proj"])
    tuned = copy_of(aligned)
    with torch.no_grad():
        for i in (0, 1):
            tuned.model.layers[i].mlp.down_proj.weight.add_(0.01 * torch.randn(32, 64))
    cos = safelora_project_(copy_of(tuned), aligned, C, n_project=0)
    low = min(cos, key=cos.get)
    one = copy_of(tuned)
    assert safelora_project_(one, aligned, C, threshold=-1.0, n_project=1) == cos
    mods, ref, orig = dict(one.named_modules()), dict(aligned.named_modules()), dict(tuned.named_modules())
    for n in C:
        dW = orig[n].weight - ref[n].weight
        want = ref[n].weight + C[n] @ dW if n == low else orig[n].weight
        torch.testing.assert_close(mods[n].weight, want)
    with pytest.raises(ValueError, match="n_project=3, expected 0..2"):
        safelora_project_(copy_of(tuned), aligned, C, n_project=3)


def test_the_schedule_sets_every_param_group_with_the_default_warmup():
    """Schedule(warmup=None) warms up over 5% of the steps (1 of 20: the first step already at the peak), and every
    param group follows lr_at at every step, the no-decay group (norm gains, biases) as well."""
    from minicwac.core.data import lr_at
    seen = []
    finetune_cwac(make(), task_seqs(), Schedule(20, 4, 1e-3),
                  on_step=lambda step, m, opt, h: seen.append([g["lr"] for g in opt.param_groups]), progress=False)
    assert len(seen) == 20 and all(len(lrs) == 2 for lrs in seen)
    for step, lrs in enumerate(seen):
        assert lrs == [pytest.approx(lr_at(step, 20, 1e-3, 1))] * 2, f"step {step}: lrs {lrs}"
