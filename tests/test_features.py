"""minicwac.core.features: latent scores, selection of planted features, z0 and L_safety by hand, readouts."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from minicwac.core.features import (latent_means, mean_diff_directions, safety_features, score_latents, select_latents)
from minicwac.io.model import GPT
from minicwac.core.sae import SAE, SAEConfig


class Identity(torch.nn.Module):
    """A 'model' whose residual after block 1 is a fixed embedding of the token: lets us plant features exactly.
    It has Hugging Face names (model.embed_tokens, model.layers.0) and no minicwac code: the core reaches its
    layer through a hook, as it would on any model."""

    def __init__(self, table):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding.from_pretrained(table, freeze=False)
        self.model.layers = torch.nn.ModuleList([torch.nn.Identity()])

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        for block in self.model.layers:
            x = block(x)
        return x


def planted_setup():
    """Tokens 10-19 are 'harmful' and light latents 3 and 7; tokens 20-29 are harmless and light latent 5."""
    d, d_sae = 8, 12
    sae = SAE(SAEConfig(d_in=d, d_sae=d_sae, k=3, layer=1))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, 3] = 1.0
        sae.W_enc[1, 7] = 1.0
        sae.W_enc[2, 5] = 1.0
    table = torch.zeros(32, d)
    table[10:20, 0] = 2.0
    table[10:20, 1] = 1.0
    table[20:30, 2] = 3.0
    table[10:20, 2] = 0.5  # harmful tokens touch the harmless latent a little
    harmful = [[10, 11, 12], [13, 14]]
    harmless = [[20, 21], [22, 23, 24]]
    return Identity(table), sae, harmful, harmless


def test_scores_and_selection_find_planted_latents():
    model, sae, harmful, harmless = planted_setup()
    s = score_latents(model, sae, harmful, harmless, pad_id=0, how="harmful")
    assert s[3] == pytest.approx(2.0) and s[7] == pytest.approx(1.0) and s[5] == pytest.approx(0.5)
    assert select_latents(s, 2).tolist() == [3, 7]
    assert sorted(select_latents(s, "firing").tolist()) == [3, 5, 7]
    c = score_latents(model, sae, harmful, harmless, pad_id=0, how="contrast")
    assert c[5] == pytest.approx(0.5 - 3.0)  # contrast pushes the harmless latent down
    assert select_latents(c, "firing").tolist() == [3, 7]
    with pytest.raises(ValueError, match="m="):
        select_latents(s, 0)
    with pytest.raises(ValueError, match="how="):
        score_latents(model, sae, harmful, harmless, pad_id=0, how="max")


def test_latent_means_skip_padding_and_bos():
    model, sae, _, _ = planted_setup()
    m = latent_means(model, sae, [[1, 10, 11], [12]], pad_id=0, skip_ids=[1])
    assert m[3] == pytest.approx(2.0)  # BOS (id 1) and the padding of the 2nd row do not dilute the mean
    m = latent_means(model, sae, [[20, 10, 11], [20, 21, 12]], pad_id=0, skip_prefix=1)
    assert m[3] == pytest.approx(2.0 * 3 / 4)  # the shared first token (harmless, id 20) is not counted


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


@pytest.fixture
def sae():
    torch.manual_seed(1)
    s = SAE(SAEConfig(d_in=32, d_sae=64, k=4, layer=1))
    with torch.no_grad():
        s.b_enc.fill_(0.1)
    return s


def seqs(n=6):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 97, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("skip_prefix", [0, 2])
def test_l_safety_by_hand(model, sae, skip_prefix):
    """L = mean over kept tokens of sum over the m selected latents of (z - z0)^2, z pre-TopK, z0 from the
    reference model: zero for that model, the hand value for a perturbed one (skip_prefix: the first positions
    of every prompt are not kept)."""
    data = seqs()
    idx = torch.tensor([5, 9, 40])
    sf = safety_features(model, data, pad_id=0, readout="pre", sae=sae, idx=idx, skip_ids=[3],
                         skip_prefix=skip_prefix)
    assert sf.m == 3 and sf.loss(model).item() == pytest.approx(0.0, abs=1e-12)
    drifted = GPT(model.config)
    drifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        drifted.model.layers[0].mlp.down_proj.weight.add_(0.05 * torch.randn_like(drifted.model.layers[0].mlp.down_proj.weight))
    total, n = 0.0, 0
    for s in data:
        ids = torch.tensor(s)
        keep = ids != 3
        keep[:skip_prefix] = False
        x0 = model(ids[None], stop_at_layer=1)[0][keep]
        x1 = drifted(ids[None], stop_at_layer=1)[0][keep]
        z0 = torch.relu((x0 - sae.b_dec) @ sae.W_enc[:, idx] + sae.b_enc[idx])
        z1 = torch.relu((x1 - sae.b_dec) @ sae.W_enc[:, idx] + sae.b_enc[idx])
        total += ((z1 - z0) ** 2).sum().item()
        n += int(keep.sum())
    assert sf.loss(drifted).item() == pytest.approx(total / n, rel=1e-5)
    batch = torch.tensor([1, 4])
    sub = safety_features(model, [data[1], data[4]], pad_id=0, readout="pre", sae=sae, idx=idx, skip_ids=[3],
                          skip_prefix=skip_prefix)
    assert sf.loss(drifted, batch).item() == pytest.approx(sub.loss(drifted).item(), rel=1e-5)


def test_readouts(model, sae):
    data = seqs()
    idx = torch.tensor([1, 2])
    x = model(torch.tensor([data[0]]), stop_at_layer=1)
    post = safety_features(model, data, 0, readout="post", sae=sae, idx=idx)
    torch.testing.assert_close(post.readout_of(x), sae.encode(x)[..., idx])
    D = torch.nn.functional.normalize(torch.randn(32, 3), dim=0)
    dirs = safety_features(model, data, 0, readout="directions", directions=D, layer=1)
    torch.testing.assert_close(dirs.readout_of(x), x @ D)
    res = safety_features(model, data, 0, readout="residual", layer=2)
    assert res.m == 32 and res.layer == 2
    with pytest.raises(ValueError, match="readout="):
        safety_features(model, data, 0, readout="sparse", sae=sae, idx=idx)
    with pytest.raises(ValueError, match="needs an SAE"):
        safety_features(model, data, 0, readout="pre")


def test_z0_read_again_through_another_forward(model, sae):
    """`rebased`: z0 re-read through the forward training will run (here: a bf16 copy, as FSDP2's bf16-mixed units
    compute), so that L_safety starts at exactly 0 there; a model that is not the aligned one is refused."""
    data, idx = seqs(), torch.tensor([5, 9, 40])
    sf = safety_features(model, data, 0, readout="pre", sae=sae, idx=idx)
    torch.testing.assert_close(sf.rebased(model).z0, sf.z0, atol=1e-6, rtol=0)
    low = GPT(model.config, dtype=torch.bfloat16)
    low.load_state_dict(model.state_dict())
    assert sf.loss(low).item() > 0  # the float32 z0 against a bf16 forward: a floor of rounding noise
    assert sf.rebased(low).loss(low).item() == 0.0 and sf.rebased(low).loss(low, torch.tensor([1, 4])).item() == 0.0
    drifted = GPT(model.config)
    drifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        drifted.model.embed_tokens.weight.mul_(1.5)
    with pytest.raises(ValueError, match="not the aligned model"):
        sf.rebased(drifted)


def test_mean_diff_directions_by_hand(model):
    a, b, harmless = seqs(3), seqs(4)[1:], seqs(5)[2:]

    def mean(ss):
        return torch.cat([model(torch.tensor([s]), stop_at_layer=1)[0] for s in ss]).mean(0)

    D = mean_diff_directions(model, 1, [a, b], harmless, pad_id=0)
    for j, g in enumerate((a, b)):
        v = mean(g) - mean(harmless)
        torch.testing.assert_close(D[:, j], v / v.norm(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer, n, depth, want", [(None, 30, 0.5, 15), (None, 7, 0.5, 3), (None, 30, 0.8, 24),
                                                   (None, 10, 0.7, 7), (None, 4, 0.8, 3), (None, 4, 0.1, 1),
                                                   (None, 4, 1.0, 4), (3, 30, 0.8, 3)])
def test_sae_layer_from_a_share_of_the_blocks(layer, n, depth, want):
    """Without a layer the SAE reads after a share `depth` of the blocks, rounded down (0.5: n // 2, the middle
    block, whatever n), at least after the first; a layer given wins. 0.8 of SmolLM2's 30 blocks is block 24."""
    from minicwac.core.features import check_sae_layer
    assert check_sae_layer(layer, n, depth) == want
