"""Reach any layer of any model by its Hugging Face module name, with forward hooks that are always removed.

    with capture(model, ["model.layers.1.mlp.down_proj"], what="input") as acts:
        model(ids)
    x = acts["model.layers.1.mlp.down_proj"]  # (B, T, intermediate_size)

    x = residual(model, ids, layer=2)         # (B, T, hidden): the residual stream after 2 blocks; nothing above runs

Nothing here knows minicwac's own model class: the same calls work on a transformers `LlamaForCausalLM`, a
GPT-2 (`transformer.h.{i}`) or any module whose blocks sit in one `nn.ModuleList`.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

# where the decoder blocks live in the usual Hugging Face layouts (minicwac's GPT uses the first)
BLOCK_LISTS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers",
               "model.language_model.layers")


class StopForward(Exception):
    """Raised by a hook to end the forward pass early; `capture` swallows it."""


def _tensor(t):
    """A block's output is a tensor, or a tuple whose first entry is the hidden state (older transformers)."""
    return t[0] if isinstance(t, (tuple, list)) else t


@contextmanager
def capture(model: torch.nn.Module, names: list[str], what: str = "output", detach: bool = True,
            stop_after: str | None = None):
    """Yield a dict name -> tensor, filled by forward hooks on the modules called `names`.

    what: "input" (the first positional input) or "output". detach=False keeps the graph (for a loss).
    A forward that `stop_after` ended raises nothing: run it inside the block and read the dict.
    """
    if what not in ("input", "output"):
        raise ValueError(f"what={what!r}, expected 'input' or 'output'")
    modules = dict(model.named_modules())  # name -> module, e.g. "model.layers.1.mlp.down_proj"
    # the module that ends the forward is hooked too, even when its tensor was not asked for
    hooked = list(dict.fromkeys(names + ([stop_after] if stop_after else [])))  # unique, in order
    unknown = [n for n in hooked if n not in modules]
    if unknown:
        raise ValueError(f"no module named {unknown[0]!r} in {type(model).__name__} "
                         f"(e.g. {next(n for n in modules if n)!r})")
    acts: dict[str, torch.Tensor] = {}  # name -> (B, T, width) tensor, filled as the forward reaches each module
    handles = []  # removed in `finally`, also when the forward raises

    # a factory: each hook keeps its own name (a closure made in the loop below would see the last one)
    def hook_for(name):
        def hook(module, inputs, output):
            t = _tensor(inputs[0] if what == "input" else output)  # `inputs`: the positional arguments
            acts[name] = t.detach() if detach else t  # detached: a read-only capture keeps no graph alive
            if name == stop_after:
                raise StopForward  # the rest of the forward never runs: cheaper, and nothing there is needed
        return hook

    try:
        for n in hooked:
            handles.append(modules[n].register_forward_hook(hook_for(n)))
        # the forward runs inside the caller's `with` block: StopForward comes back to us at this yield
        try:
            yield acts
        except StopForward:
            pass
    finally:  # the hooks never outlive the block, whatever happened in it
        for h in handles:
            h.remove()


def block_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList that holds the decoder blocks, and its name ("model.layers" for Llama-style models)."""
    for name in BLOCK_LISTS:  # the first of the usual layouts that this model has
        try:
            blocks = model.get_submodule(name)
        except AttributeError:  # get_submodule's answer to a path that does not exist
            continue
        if isinstance(blocks, torch.nn.ModuleList):  # a module of that name that is not the block list does not count
            return name, blocks
    # a wrapped model (PEFT's base_model.model., DDP's module., torch.compile's _orig_mod.): the same layout one or
    # more levels down; the shortest such name is the model's own block list
    wrapped = sorted((n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)
                      and any(n.endswith("." + b) for b in BLOCK_LISTS)), key=len)
    if wrapped:
        return wrapped[0], model.get_submodule(wrapped[0])
    raise ValueError(f"{type(model).__name__} has no decoder block list; expected one of {', '.join(BLOCK_LISTS)}")


def num_blocks(model: torch.nn.Module) -> int:
    return len(block_list(model)[1])


def block_name(model: torch.nn.Module, layer: int) -> str:
    """The module whose output is the residual stream after `layer` blocks (1..n): e.g. "model.layers.{layer-1}"."""
    name, blocks = block_list(model)
    # bool is a subclass of int: layer=True would pass as 1
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= len(blocks):
        raise ValueError(f"layer={layer!r}, expected 1..{len(blocks)} (the residual stream after that many blocks)")
    return f"{name}.{layer - 1}"  # block layer - 1 (0-based) outputs the stream after `layer` blocks


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters live (a parameter-free stub: its `device` attribute, else the CPU)."""
    p = next(model.parameters(), None)  # the first parameter stands for all of them
    if p is not None:
        return p.device
    return torch.device(getattr(model, "device", None) or "cpu")


def residual(model: torch.nn.Module, ids: torch.Tensor, layer: int, grad: bool = False) -> torch.Tensor:
    """The residual stream after `layer` blocks, (B, T, hidden), read by a hook; the forward stops right there.

    grad=True keeps the graph (L_safety backpropagates through it)."""
    name = block_name(model, layer)
    # grad=True inside torch.no_grad() still builds no graph
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        # the hooked block is also where the forward stops: nothing above `layer` runs
        with capture(model, [name], detach=not grad, stop_after=name) as acts:
            model(ids)  # ends at the hook (StopForward, which capture swallows)
    if not (grad and torch.is_grad_enabled()):  # no backward follows
        reshard(model)
    return acts[name]  # (B, T, hidden)


def reshard(model: torch.nn.Module) -> None:
    """After a forward that stopped inside a sharded model (FSDP2) with no backward to follow: the units it passed
    through still hold their gathered weights, which an optimizer or a checkpoint would then see instead of the
    shards. FSDP2's recovery from an aborted forward puts them back. No-op on an unsharded model."""
    if hasattr(model, "reset_iter_state"):  # the root of a `fully_shard`ed model
        model.reset_iter_state()


def logits_of(out) -> torch.Tensor:
    """Logits from a forward's result: minicwac's GPT returns them, transformers returns an output with .logits."""
    return out.logits if hasattr(out, "logits") else out
