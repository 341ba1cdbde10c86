"""Exercise checks for notebook 06 (safety features): each builds its own tiny model, SAE and prompts."""
from __future__ import annotations

import torch

from minicwac.core import features
from minicwac.core.data import pad_right, token_mask
from minicwac.core.hooks import residual
from minicwac.core.sae import SAE, SAEConfig
from minicwac.io.config import Config
from minicwac.io.model import GPT

PAD, BOS = 0, 1


def _prompts(g: torch.Generator, n: int) -> list[list[int]]:
    """n seeded prompts of 3-9 tokens: BOS, then random ids."""
    lengths = torch.randint(3, 10, (n,), generator=g).tolist()
    return [[BOS] + torch.randint(2, 97, (t - 1,), generator=g).tolist() for t in lengths]


def _setup():
    """A seeded tiny GPT (hidden 32, 2 blocks), an SAE after block 1 (d_sae 48, k 4), harmful and harmless prompts."""
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    sae = SAE(SAEConfig(d_in=32, d_sae=48, k=4, layer=1), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.b_enc.copy_(0.05 * torch.randn(48, generator=g))
    return model, sae, _prompts(g, 12), _prompts(g, 10)


@torch.no_grad()
def _latents(model, sae, seqs):
    ids, mask = pad_right(seqs, PAD)
    return sae.encode(residual(model, ids, sae.cfg.layer)), token_mask(ids, mask, [BOS])  # (N, T, d_sae), (N, T)


def check_latent_scores(fn) -> None:
    """`fn(z_harm, keep_harm, z_safe, keep_safe, how)` should give the scores of `features.score_latents`."""
    model, sae, harmful, harmless = _setup()
    z_h, keep_h = _latents(model, sae, harmful)
    z_s, keep_s = _latents(model, sae, harmless)
    for how in ("harmful", "contrast"):
        want = features.score_latents(model, sae, harmful, harmless, PAD, [BOS], how=how, values="post")
        got = fn(z_h, keep_h, z_s, keep_s, how)
        assert isinstance(got, torch.Tensor) and got.shape == want.shape, \
            f"how={how!r}: expected a tensor of shape {tuple(want.shape)} (one score per latent), got " \
            f"{getattr(got, 'shape', type(got))}"
        if how == "harmful":
            if torch.allclose(got, z_h.mean((0, 1)), atol=1e-6) and not torch.allclose(want, z_h.mean((0, 1))):
                raise AssertionError("the mean runs over padding and BOS too: average only the tokens where "
                                     "keep_harm is True (z_harm[keep_harm].mean(0))")
            per_prompt = torch.stack([z_h[i][keep_h[i]].mean(0) for i in range(len(z_h))]).mean(0)
            if torch.allclose(got, per_prompt, atol=1e-6):
                raise AssertionError("that is a mean of per-prompt means: the package pools every kept token, so "
                                     "long prompts weigh more")
        else:
            flipped = -want
            if torch.allclose(got, flipped, atol=1e-6):
                raise AssertionError("contrast has the wrong sign: harmful mean MINUS harmless mean")
        torch.testing.assert_close(got, want, msg=f"how={how!r}: the scores differ from features.score_latents: "
                                   "the mean of z over kept harmful tokens (minus the mean over kept harmless "
                                   "tokens for 'contrast')")
