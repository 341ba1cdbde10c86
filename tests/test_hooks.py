"""minicwac.core.hooks.capture: captures inputs/outputs by name, can stop the forward, always removes its hooks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from minicwac.core.hooks import capture
from minicwac.io.model import GPT


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


def n_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_captures_down_proj_input_and_layer_output(model):
    ids = torch.randint(0, 97, (2, 5))
    name = "model.layers.1.mlp.down_proj"
    with capture(model, [name, "model.layers.0"], what="input") as acts_in:
        model(ids)
    with capture(model, ["model.layers.0", "model.layers.1.post_attention_layernorm"]) as acts_out:
        model(ids)
    mlp = model.model.layers[1].mlp
    h = acts_out["model.layers.1.post_attention_layernorm"]
    torch.testing.assert_close(acts_in[name], F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))  # SwiGLU by hand
    torch.testing.assert_close(acts_out["model.layers.0"], model(ids, stop_at_layer=1))
    assert not acts_in[name].requires_grad and n_hooks(model) == 0


def test_stop_after_skips_the_rest(model):
    ids = torch.randint(0, 97, (1, 4))
    calls = []
    h = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    with capture(model, [], stop_after="model.layers.0") as acts:
        model(ids)
    h.remove()
    assert calls == [] and acts["model.layers.0"].shape == (1, 4, 32) and n_hooks(model) == 0


def test_keeps_graph_when_not_detached(model):
    with capture(model, ["model.layers.1"], detach=False) as acts:
        model(torch.randint(0, 97, (1, 3)))
    assert acts["model.layers.1"].grad_fn is not None


def test_hooks_removed_on_exception(model):
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, ["model.layers.0"]):
            raise RuntimeError("boom")
    assert n_hooks(model) == 0


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="no module named 'model.layers.9'"):
        with capture(model, ["model.layers.9"]):
            pass
    with pytest.raises(ValueError, match="expected 'input' or 'output'"):
        with capture(model, ["model.layers.0"], what="weights"):
            pass
