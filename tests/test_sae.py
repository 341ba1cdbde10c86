"""minicwac.core.sae: the TopK SAE's forward, metrics by hand, decoder norms, folding, recovery of planted features."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from minicwac.io.model import GPT
from minicwac.core.sae import (SAE, SAEConfig, ce_recovered, dead_fraction, fvu, geometric_median, harvest, l0,
                          sae_metrics, train_sae)


def planted(n_feat=64, d=32, k=3, n=50_000, seed=0):
    """x = c D: each row mixes k of n_feat known unit directions with positive weights in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_feat, d, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_feat, generator=g).argsort(1)[:, :k]
    c = torch.zeros(n, n_feat).scatter_(1, idx, 0.5 + torch.rand(n, k, generator=g))
    return c @ D, D, c


@pytest.fixture(scope="module")
def trained():
    x, D, _ = planted()
    sae, hist = train_sae(x, 64, 3, layer=1, steps=1500, batch_size=512, lr=3e-3, dead_tokens=5000, progress=False)
    return sae, hist, x, D


def test_recovers_planted_features(trained):
    """Every planted direction has a decoder row with cosine >= 0.99 (mean), within a few seconds on CPU."""
    sae, _, _, D = trained
    cos = (D @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).T).max(1).values
    assert cos.mean() >= 0.99, f"mean max cosine {cos.mean():.4f}"


def test_decoder_rows_stay_unit_norm(trained):
    sae = trained[0]
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6, rtol=0)


def test_history_and_metrics(trained):
    sae, hist, x, _ = trained
    assert set(hist) == {"step", "loss", "l0", "fvu", "dead_fraction"} and hist["step"][-1] == 1499
    assert hist["fvu"][-1] < hist["fvu"][0]
    m = sae_metrics(sae, x[:5000])
    assert m["l0"] == pytest.approx(3.0) and m["fvu"] < 0.1 and m["dead_fraction"] == 0.0
    assert m["density"].shape == (64,) and m["density"].sum() == pytest.approx(3.0)


def test_forward_by_hand():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=6, d_sae=10, k=2, layer=1))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.scale.fill_(1.7)
    x = torch.randn(4, 6)
    pre = torch.relu((1.7 * x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    z = torch.zeros_like(pre)
    for i in range(4):
        top = pre[i].argsort(descending=True)[:2]
        z[i, top] = pre[i, top]
    x_hat = (z @ sae.W_dec + sae.b_dec) / 1.7
    got_hat, got_z = sae(x)
    torch.testing.assert_close(got_z, z)
    torch.testing.assert_close(got_hat, x_hat)
    torch.testing.assert_close(sae.pre_acts(x, torch.tensor([7, 2])), pre[:, [7, 2]])


def test_folding_the_scale_keeps_reconstructions(trained, tmp_path):
    sae, _, x, _ = trained
    assert sae.scale.item() != 1.0
    before = sae(x[:500])
    folded = SAE(sae.cfg)
    folded.load_state_dict(sae.state_dict())
    folded.fold_scale_()
    assert folded.scale.item() == 1.0
    after = folded(x[:500])
    torch.testing.assert_close(after[0], before[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[1], before[1], atol=1e-5, rtol=1e-5)
    sae.save(tmp_path / "sae", extra={"note": "x"})
    loaded = SAE.load(tmp_path / "sae")
    torch.testing.assert_close(loaded(x[:500])[0], before[0], atol=1e-5, rtol=1e-5)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["d_sae"] == 64 and cfg["k"] == 3 and cfg["note"] == "x"


def test_metrics_on_hand_computed_tensors():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]])  # mean (2, 1)
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0], [2.0, 2.0]])
    # ||x - mean||^2: (1 + 1) + (1 + 1) + (0 + 4) = 8; ||x - x_hat||^2: 1 + 0 + 1 = 2
    assert fvu(x, x_hat) == pytest.approx(2 / 8)
    z = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    assert l0(z) == pytest.approx(4 / 3)
    assert dead_fraction(z) == pytest.approx(0.5)  # latents 0 and 3 never fire


def test_geometric_median_resists_an_outlier():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    gm = geometric_median(pts)
    assert gm.norm() < 1.5 < pts.mean(0).norm()
    sq = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    torch.testing.assert_close(geometric_median(sq), torch.tensor([1.0, 1.0]), atol=1e-4, rtol=0)


def test_aux_loss_trains_dead_latents():
    """A latent outside every TopK gets no gradient from the MSE; AuxK gives the dead ones one. Count the encoder
    columns that moved away from their initial value with and without it."""
    x, _, _ = planted(n=5_000, seed=1)
    init = SAE(SAEConfig(32, 256, 3, 1), seed=0).W_enc.detach()
    moved = {}
    for coef in (0.0, 1 / 32):
        sae, hist = train_sae(x, 256, 3, layer=1, steps=3, batch_size=64, lr=1e-3, aux_coef=coef, dead_tokens=0,
                              seed=0, progress=False)
        moved[coef] = int(((sae.W_enc.detach() - init).abs().amax(0) > 0).sum())
        assert not math.isnan(hist["loss"][-1])
    assert moved[1 / 32] > moved[0.0], moved


def test_harvest_drops_padding_and_bos():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    seqs = [[1, 5, 6, 7], [1, 8, 9]]
    x = harvest(model, seqs, layer=1, pad_id=0, skip_ids=[1])
    assert x.shape == (5, 32)
    torch.testing.assert_close(x[:3], model(torch.tensor([seqs[0]]), stop_at_layer=1)[0, 1:])
    torch.testing.assert_close(x[3:], model(torch.tensor([seqs[1]]), stop_at_layer=1)[0, 1:])


def test_ce_recovered_is_one_for_a_perfect_reconstruction():
    """An SAE with W_enc = [I, -I], W_dec = [I; -I], k = d_in reproduces x exactly, so all the CE is recovered."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    d = 32
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, k=d, layer=1))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    seqs = [torch.randint(3, 97, (10,)).tolist() for _ in range(4)]
    ce = ce_recovered(model, sae, seqs, pad_id=0)
    assert ce["recovered"] == pytest.approx(1.0, abs=1e-5)
    ids = torch.tensor(seqs)
    with torch.no_grad():
        clean = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert ce["clean"] == pytest.approx(float(clean), rel=1e-5) and ce["zero"] != ce["clean"]


def test_bad_config_and_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="k=0"):
        SAEConfig(d_in=4, d_sae=8, k=0, layer=1)
    with pytest.raises(ValueError, match="b_dec_init"):
        train_sae(torch.randn(10, 4), 8, 2, 1, b_dec_init="zeros", progress=False)
    with pytest.raises(FileNotFoundError, match="sae.safetensors"):
        SAE.load(tmp_path)
    SAE(SAEConfig(4, 8, 2, 1)).save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 16}))
    with pytest.raises(ValueError, match="expected"):
        SAE.load(tmp_path / "s")
