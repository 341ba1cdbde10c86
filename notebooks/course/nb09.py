"""Checks for the exercises of notebook 09 (a real checkpoint: SmolLM2-135M-Instruct).

Each check builds its own small inputs (seeded random tensors) and compares your function with the package's own
code; an AssertionError says what differs and what the likely mistake is.
"""
from __future__ import annotations

import torch

from minicwac.io.gguf import unpermute_qk


def _llama_cpp_order(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to a q_proj / k_proj weight: each head's two halves interleaved, row j of
    the first half to row 2j, row j of the second half to row 2j + 1."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def check_unpermute(fn) -> None:
    """fn(w, n_heads) -> w's rows from llama.cpp's order back in Hugging Face's."""
    for seed, (n_heads, head_dim, cols) in enumerate([(3, 8, 5), (9, 64, 4), (1, 2, 3)]):
        g = torch.Generator().manual_seed(seed)
        hf = torch.randn(n_heads * head_dim, cols, generator=g)
        gguf = _llama_cpp_order(hf, n_heads)
        got = fn(gguf, n_heads)
        assert isinstance(got, torch.Tensor) and got.shape == hf.shape, \
            f"expected a tensor of shape {tuple(hf.shape)}, got {getattr(got, 'shape', type(got))}"
        if head_dim > 2 and torch.equal(got, gguf):
            raise AssertionError("the rows came back unchanged: llama.cpp's order differs from Hugging Face's")
        if n_heads > 1 and torch.equal(got, fn(gguf, 1)) and not torch.equal(got, hf):
            raise AssertionError("the result does not depend on n_heads: the halves are per head, not of the whole "
                                 "matrix (reshape to (n_heads, ...) first)")
        if torch.equal(got, _llama_cpp_order(gguf, n_heads)) and not torch.equal(got, hf):
            raise AssertionError("you applied llama.cpp's permutation a second time: read each head's rows as "
                                 "(head_dim/2, 2) pairs and swap those two axes, not (2, head_dim/2)")
        torch.testing.assert_close(got, hf, rtol=0, atol=0, msg=lambda m: (
            f"{n_heads} heads of dim {head_dim}: the rows are not back in Hugging Face's order ({m}). Row 2j of a "
            "head should go to j, row 2j + 1 to j + head_dim/2"))
        torch.testing.assert_close(got, unpermute_qk(gguf, n_heads), rtol=0, atol=0,
                                   msg=lambda m: f"differs from minicwac.io.gguf.unpermute_qk ({m})")
