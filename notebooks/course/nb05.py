"""Exercise checks for notebook 05 (the sparse autoencoder): each builds its own small SAE and inputs."""
from __future__ import annotations

import torch

from minicwac.core.sae import SAE, SAEConfig


def _small_sae() -> tuple[SAE, torch.Tensor]:
    """A seeded SAE (d_in 16, d_sae 64, k 4) with a non-trivial scale and biases, and 40 seeded inputs."""
    g = torch.Generator().manual_seed(5)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, k=4, layer=1), seed=3)
    with torch.no_grad():
        sae.scale.fill_(1.7)
        sae.b_dec.copy_(torch.randn(16, generator=g))
        sae.b_enc.copy_(0.3 * torch.randn(64, generator=g))
    x = 2.0 * torch.randn(40, 16, generator=g) + 0.5
    return sae, x


def check_topk_encode(fn) -> None:
    """`fn(sae, x)` should return the sparse latents z (n, d_sae), as `sae.encode(x)`."""
    sae, x = _small_sae()
    with torch.no_grad():
        want = sae.encode(x)
        got = fn(sae, x)
        assert isinstance(got, torch.Tensor) and got.shape == want.shape, \
            f"expected a tensor of shape {tuple(want.shape)} (tokens, d_sae), got {getattr(got, 'shape', type(got))}"
        nnz = (got != 0).sum(-1)
        assert int(nnz.max()) <= sae.cfg.k, \
            f"a token has {int(nnz.max())} non-zero latents: TopK keeps only the k = {sae.cfg.k} largest, zero the rest"
        assert float(got.min()) >= 0, "negative latents: apply the ReLU before the TopK"
        h_wrong = (x - sae.b_dec) * sae.scale  # subtracting b_dec before scaling
        if torch.allclose(got, sae.topk(torch.relu(h_wrong @ sae.W_enc + sae.b_enc)), atol=1e-5):
            raise AssertionError("scale first, then centre: h = x * sae.scale - sae.b_dec (b_dec lives in the "
                                 "normalised space)")
        if torch.allclose(got, sae.topk(torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)), atol=1e-5):
            raise AssertionError("the input scale is missing: multiply x by sae.scale before subtracting b_dec")
        if torch.allclose(got, sae.topk(torch.relu(x * sae.scale @ sae.W_enc + sae.b_enc)), atol=1e-5):
            raise AssertionError("b_dec is missing: the encoder reads x * sae.scale - sae.b_dec")
        torch.testing.assert_close(got, want, msg="z differs from sae.encode(x): pre = ReLU((x*scale - b_dec) @ W_enc "
                                   "+ b_enc), then keep each token's k largest values in place and zero the others")
