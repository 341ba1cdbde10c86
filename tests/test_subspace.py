"""minicwac.core.subspace: covariance, eigen/SVD/randomized bases, rank by energy, the exact weight constraint, folders."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from minicwac.core.cwac import Constraints, Schedule, finetune_cwac
from minicwac.core.hooks import capture
from minicwac.io.model import GPT
from minicwac.core.data import pad_right, shared_prefix
from minicwac.core.subspace import (ALL_LINEARS, Subspace, compute_subspace, eigh_desc, input_covariance,
                                    randomized_eigh, rank_for_energy, svd_basis, target_names)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


def prompts(n=12, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_target_names_by_pattern(model):
    assert target_names(model) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(target_names(model, ALL_LINEARS)) == 2 * 7
    with pytest.raises(ValueError, match="no linear layer matches"):
        target_names(model, [r"model\.layers\.\d+\.mlp\.nope"])


def test_shared_prefix_by_hand():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix([[1, 2], [1, 2, 3]]) == 2  # one sequence is a prefix of the other
    assert shared_prefix([[7, 1], [8, 1]]) == 0
    assert shared_prefix([[4, 5, 6]]) == 3 and shared_prefix([]) == 0


@pytest.mark.parametrize("skip_prefix", [0, 3])
def test_covariance_matches_hand_computation(model, skip_prefix):
    """Streaming in float64 over batches = X^T X / n on the concatenated kept tokens (skipped id dropped, and
    with skip_prefix the first positions of every sequence)."""
    seqs = prompts()
    name = "model.layers.1.mlp.down_proj"
    C, n = input_covariance(model, seqs, [name], pad_id=0, skip_ids=[5], batch_size=5, skip_prefix=skip_prefix)
    rows = []
    for s in seqs:
        with capture(model, [name], what="input") as acts:
            model(torch.tensor([s]))
        keep = torch.tensor(s) != 5
        keep[:skip_prefix] = False
        rows.append(acts[name][0][keep])
    X = torch.cat(rows).double()
    assert n == len(X)
    torch.testing.assert_close(C[name], X.T @ X / len(X))


def test_eigh_and_svd_views_agree():
    X = torch.randn(200, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    evals, V = eigh_desc(X.T @ X / 200)
    s2, W = svd_basis(X)
    torch.testing.assert_close(evals, s2)
    torch.testing.assert_close((V.T @ W).abs(), torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)  # up to sign
    assert (evals[:-1] >= evals[1:]).all()


def test_randomized_eigh_finds_the_top_eigenpairs():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64, generator=g))
    lam = torch.logspace(2, -4, 300, dtype=torch.float64)
    C = Q @ torch.diag(lam) @ Q.T
    evals, V = randomized_eigh(C, 20, generator=g)
    # a slowly decaying spectrum (ratio 0.955 per index): the last pairs converge slowest
    torch.testing.assert_close(evals, lam[:20], rtol=1e-3, atol=0)
    torch.testing.assert_close((V.T @ Q[:, :10]).abs().diagonal()[:10], torch.ones(10, dtype=torch.float64),
                               atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="niter"):
        randomized_eigh(C, 5, niter=2)


def test_rank_for_energy_by_hand():
    ev = torch.tensor([6.0, 3.0, 0.9, 0.1])  # cumulative share 0.6, 0.9, 0.99, 1.0
    assert [rank_for_energy(ev, e) for e in (0.5, 0.6, 0.61, 0.9, 0.95, 0.99, 1.0)] == [1, 1, 2, 2, 3, 3, 4]
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="energy"):
            rank_for_energy(ev, bad)


def test_subspace_basis_is_orthonormal_and_projector_idempotent(model):
    sub = compute_subspace(model, prompts(), pad_id=0, energy=0.9)
    for name, S in sub.S.items():
        k, d = sub.ranks()[name]
        assert 0 < k < d
        torch.testing.assert_close(S.T @ S, torch.eye(k), atol=1e-5, rtol=0)
        P = S @ S.T
        torch.testing.assert_close(P, P.T)
        torch.testing.assert_close(P @ P, P, atol=1e-5, rtol=0)
        torch.testing.assert_close(sub.W0S[name], dict(model.named_modules())[name].weight @ S)
    assert sub.cfg["energy"] == 0.9 and sub.cfg["n_prompts"] == 12 and len(sub.cfg["prompts_sha256"]) == 16


def test_randomized_path_gives_the_same_subspace(model):
    exact = compute_subspace(model, prompts(), pad_id=0, energy=0.95)
    rand = compute_subspace(model, prompts(), pad_id=0, energy=0.95, randomized_above=8)
    for name in exact.S:
        assert exact.ranks()[name] == rand.ranks()[name]
        torch.testing.assert_close(rand.S[name] @ rand.S[name].T, exact.S[name] @ exact.S[name].T, atol=1e-4, rtol=0)


def _drift_set(n=32, T=10):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(3, 97, (T,), generator=g).tolist(), [1] * T) for _ in range(n)]


def test_update_projection_is_exact_under_adamw_with_weight_decay(model):
    """After many AdamW steps with weight decay, (W - W0) S = 0 to float precision and the leak is <= 1e-5."""
    ref = GPT(model.config)
    ref.load_state_dict(model.state_dict())
    sub = compute_subspace(model, prompts(), pad_id=0, energy=0.99)
    finetune_cwac(model, _drift_set(), Schedule(40, 8, 1e-2, 0.1), Constraints(sub, None, 0.5, 16), progress=False)
    mods, refm = dict(model.named_modules()), dict(ref.named_modules())
    for name, S in sub.S.items():
        dW = mods[name].weight - refm[name].weight
        assert dW.norm() > 1e-2, "the weights did not move: the test would prove nothing"
        torch.testing.assert_close(mods[name].weight @ S, sub.W0S[name], atol=1e-5, rtol=0)
    assert max(sub.leak(model, ref).values()) <= 1e-5


def test_gradient_projection_alone_leaks_under_adam(model):
    """Projecting only the gradient lets AdamW's per-coordinate scaling and weight decay move W S."""
    ref = GPT(model.config)
    ref.load_state_dict(model.state_dict())
    sub = compute_subspace(model, prompts(), pad_id=0, energy=0.99)
    finetune_cwac(model, _drift_set(), Schedule(40, 8, 1e-2, 0.1),
                  Constraints(sub, None, 0.5, 16, project_update=False, project_grad=True), progress=False)
    assert min(sub.leak(model, ref).values()) > 0.05


def test_save_load_round_trip_and_errors(model, tmp_path):
    sub = compute_subspace(model, prompts(), pad_id=0, k=5, model_folder="some/model")
    sub.save(tmp_path / "sub")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["cfg.json", "subspace.safetensors"]
    back = Subspace.load(tmp_path / "sub")
    assert back.cfg == sub.cfg and back.cfg["k"] == 5 and back.cfg["model"] == "some/model"
    for n in sub.S:
        assert torch.equal(back.S[n], sub.S[n]) and torch.equal(back.W0S[n], sub.W0S[n])
    with pytest.raises(FileNotFoundError, match="subspace.safetensors"):
        Subspace.load(tmp_path / "nowhere")
    (tmp_path / "sub" / "subspace.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable subspace folder"):
        Subspace.load(tmp_path / "sub")


def test_projection_rejects_a_model_of_another_shape(model):
    sub = compute_subspace(model, prompts(), pad_id=0, k=3)
    other = GPT(tiny_config(intermediate_size=48))
    with pytest.raises(ValueError, match="subspace expects"):
        sub.project_(other)


def test_leak_on_unconstrained_training_is_large(model):
    """Sanity check of the metric: plain fine-tuning moves W S (so a zero leak above is the constraint's doing)."""
    ref = GPT(model.config)
    ref.load_state_dict(model.state_dict())
    sub = compute_subspace(model, prompts(), pad_id=0, energy=0.99)
    finetune_cwac(model, _drift_set(), Schedule(20, 8, 1e-2), progress=False)
    assert min(sub.leak(model, ref).values()) > 0.3


def test_a_target_with_zero_inputs_is_named_in_a_warning():
    """trace(C) = 0 (the layer's inputs are all zero on the calibration tokens) gives rank 0: say so."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()  # down_proj's input act(gate x) * (up x) = 0
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.down_proj: trace\(C\) = 0"):
        sub = compute_subspace(model, [[5, 6, 7, 8]] * 3, pad_id=0)
    assert sub.ranks()["model.layers.0.mlp.down_proj"][0] == 0
    assert sub.ranks()["model.layers.1.mlp.down_proj"][0] > 0


def _inputs(model, seqs, names):
    """The inputs X (tokens, in) of each named linear on `seqs` (padding left out), in float64."""
    ids, mask = pad_right(seqs, 0)
    with torch.no_grad(), capture(model, names, what="input") as acts:
        model(ids)
    return {n: acts[n][mask.bool()].double() for n in names}


def test_s_holds_the_energy_and_protects_held_out_harmful_inputs(model):
    """S is the top of the spectrum: on the calibration inputs it holds at least the energy asked for, and its
    first k - 1 directions less (the small-eigenvalue directions would hold almost nothing). After a fine-tune,
    each target's output on held-out inputs moves far less with the projection than without."""
    calib, held = prompts(40, seed=0), prompts(20, seed=7)
    energy = 0.9
    sub = compute_subspace(model, calib, pad_id=0, energy=energy)
    X = _inputs(model, calib, list(sub.S))
    for name, S in sub.S.items():
        S, x = S.double(), X[name]
        share = float((x @ S).norm() ** 2 / x.norm() ** 2)
        short = float((x @ S[:, :-1]).norm() ** 2 / x.norm() ** 2)
        assert short < energy <= share + 1e-9, f"{name}: S holds {share:.3f} of the energy, its first k-1 {short:.3f}"
    sub = compute_subspace(model, calib, pad_id=0, energy=0.99)  # the default energy for the fine-tune
    moved = {}
    for label, constraints in (("sft", None), ("weight", Constraints(sub, None, 0.0, 1))):
        tuned = GPT(model.config)
        tuned.load_state_dict(model.state_dict())
        finetune_cwac(tuned, _drift_set(), Schedule(20, 8, 1e-2, 0.1, seed=0), constraints, progress=False)
        Xh = _inputs(model, held, list(sub.S))  # held-out inputs, as the aligned model sees them
        mods, ref = dict(tuned.named_modules()), dict(model.named_modules())
        moved[label] = {n: float((Xh[n] @ (mods[n].weight - ref[n].weight).detach().double().T).norm()
                                 / (Xh[n] @ ref[n].weight.detach().double().T).norm()) for n in sub.S}
    # measured: 0.29-0.31x SFT's on the two layers (random-token prompts put more of their energy outside a
    # 40-prompt S than real harmful prompts do); with the small-eigenvalue directions as S it would be about 1x
    for n in sub.S:
        assert moved["weight"][n] < 0.5 * moved["sft"][n], \
            f"{n}: on held-out inputs the constrained layer moved {moved['weight'][n]:.4f}, SFT's {moved['sft'][n]:.4f}"
