"""Capture what named modules see or produce during a forward pass, and always remove the hooks afterwards.

    with capture(model, ["model.layers.1.mlp.down_proj"], what="input") as acts:
        model(ids)
    x = acts["model.layers.1.mlp.down_proj"]  # (B, T, intermediate_size)

Modules are selected by their Hugging Face names, so the same call works on the toy model and on real
checkpoints. `stop_after=name` ends the forward pass right after that module (nothing above it runs).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class StopForward(Exception):
    """Raised by a hook to end the forward pass early; `capture` swallows it."""


@contextmanager
def capture(model: torch.nn.Module, names: list[str], what: str = "output", detach: bool = True,
            stop_after: str | None = None):
    """Yield a dict name -> tensor, filled by forward hooks on the modules called `names`.

    what: "input" (the first positional input) or "output". detach=False keeps the graph (for a loss).
    A forward that `stop_after` ended raises nothing: run it inside the block and read the dict.
    """
    if what not in ("input", "output"):
        raise ValueError(f"what={what!r}, expected 'input' or 'output'")
    modules = dict(model.named_modules())
    hooked = list(dict.fromkeys(names + ([stop_after] if stop_after else [])))  # unique, in order
    unknown = [n for n in hooked if n not in modules]
    if unknown:
        raise ValueError(f"no module named {unknown[0]!r} in {type(model).__name__} "
                         f"(e.g. {next(n for n in modules if n)!r})")
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name):
        def hook(module, inputs, output):
            t = inputs[0] if what == "input" else output
            acts[name] = t.detach() if detach else t
            if name == stop_after:
                raise StopForward
        return hook

    try:
        for n in hooked:
            handles.append(modules[n].register_forward_hook(hook_for(n)))
        try:
            yield acts
        except StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
