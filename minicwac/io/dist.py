"""Past one device: the same fine-tuning under FSDP2, started by torchrun. No collective code of our own: sharding,
gathering and checkpointing are torch.distributed's (`fully_shard`, `get_model_state_dict`, `dcp.save`).

    torchrun --nproc_per_node 8 -m minicwac finetune --device cuda ...   # 8 GPUs, NCCL
    torchrun --nproc_per_node 2 -m minicwac finetune --device cpu ...    # 2 CPU processes, gloo

What each piece does:
- `load_pretrained`: the model built on the meta device, sharded, then each rank reads only its own rows of every
  tensor of a Hugging Face folder (no rank ever holds the whole model).
- `shard_model`: `fully_shard` on every decoder block, then on the whole model (embeddings, final norm, head).
  Every weight is split by rows (dim 0) over the ranks and kept in float32 (the master shards); "bf16-mixed"
  computes in bf16 (`MixedPrecisionPolicy`) and reduces gradients in float32, so the projection acts on float32
  weights and W S = W0 S stays exact. The ranks' gradients are summed, not averaged: each rank's loss is already
  its share of the global batch's mean (`core.cwac.finetune_cwac` with a `Process`).
- The weight constraint runs on each rank's rows (`Subspace.shard`): row i of W S - W0S needs only row i of W.
- L_safety's partial forward runs the sharded blocks up to the SAE layer like any forward.
- `full_state`: the whole model gathered to rank 0's CPU for the Hugging Face folder.
- `save_sharded` / `load_sharded`: a resumable checkpoint in which every rank writes its own shards of the weights
  and of the AdamW states as safetensors (torch.distributed.checkpoint's Hugging Face writer: the shard offsets
  live in the safetensors headers; nothing is pickled), plus state.json (step, history, run, param groups, its
  format and world size); `load_sharded` reads it on any number of ranks (one process too) and `load_whole` reads
  a one-process checkpoint on N ranks: `--resume` works across world sizes.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.files import replace_folder
from ..core.hooks import block_list


def launched() -> bool:
    """True in a process torchrun started (it sets LOCAL_RANK and WORLD_SIZE), even with one process."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class Process:
    """This process's place in the run."""

    rank: int
    world_size: int  # processes in the run
    device: torch.device  # where the batches and the computation go

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str = "cpu") -> Process:
    """Join the process group torchrun set up: NCCL on GPUs (one per process, cuda:LOCAL_RANK), gloo on the CPU."""
    kind = str(device).split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: a sharded run needs cpu (gloo) or cuda (NCCL)")
    dev = torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but no GPU is visible")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", device_id=dev if kind == "cuda" else None)
    return Process(dist.get_rank(), dist.get_world_size(), dev)


def shard_model(model: torch.nn.Module, proc: Process, dtype: str = "fp32", offload: bool = False) -> torch.nn.Module:
    """FSDP2 on `model` in place: each decoder block is one unit, the rest (embeddings, norm, head) the root unit.

    dtype "bf16-mixed": bf16 compute over float32 master shards, gradients reduced in float32. offload: the
    shards, their gradients and the AdamW states live in CPU memory (the optimizer step runs there)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    if dtype not in ("fp32", "bf16-mixed"):
        raise ValueError(f"dtype={dtype!r}, expected fp32 or bf16-mixed")
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("shard a float32 model: the master shards the constraint acts on are float32")
    mesh = init_device_mesh(proc.device.type, (proc.world_size,))
    kw = {"mesh": mesh, "offload_policy": CPUOffloadPolicy(pin_memory=proc.device.type == "cuda") if offload
          else OffloadPolicy(),
          "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if dtype == "bf16-mixed" else MixedPrecisionPolicy()}
    units = [fully_shard(block, **kw) for block in block_list(model)[1]] + [fully_shard(model, **kw)]
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sum the ranks' gradients: each loss is already its share of the mean
        unit.set_force_sum_reduction_for_comms(True)  # as a plain SUM (gloo has no pre-scaled sum)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return hasattr(next(model.parameters()), "device_mesh")


def load_pretrained(path: str | Path, proc: Process, dtype: str = "fp32", offload: bool = False, lora=None,
                    seed: int = 0) -> torch.nn.Module:
    """A Hugging Face folder as a sharded float32 model, no rank ever holding the whole of it: the model is built
    on the meta device (with the LoRA adapters of `lora`, if any), sharded, and each rank reads only its own rows
    of every tensor from the safetensors files (torch.distributed.checkpoint's Hugging Face reader, which casts
    to float32 as it copies). The folder is checked first (`hf.check_pretrained`). GPT-2's checkpoint names and
    layouts are not the model's: it is read whole on every rank, then sharded."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load

    from ..core.lora import add_lora, init_lora_
    from .hf import weights_dtype, check_pretrained
    from .hf import load_pretrained as load_whole
    model, _, found, plan = check_pretrained(path)
    weights_dtype(found, [name for name, _, _ in plan], torch.float32)  # refuses quantized weights
    if model.config.model_type == "gpt2":
        model = load_whole(path, "cpu", torch.float32)
        if lora is not None:
            add_lora(model, lora, seed)
        return shard_model(model, proc, dtype, offload)
    if lora is not None:
        add_lora(model, lora, seed)  # on the meta device: drawn below, once the shards exist
    shard_model(model, proc, dtype, offload)
    model.to_empty(device="cpu" if offload else proc.device)
    state = {k: v for k, v in model.state_dict().items() if k in found}  # not the adapters, nor a tied head
    load(state, storage_reader=HuggingFaceStorageReader(str(path)))
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v.to_local()).all())]
    if max_over_ranks(float(len(bad))) > 0:  # every rank takes part, whichever holds the bad rows
        raise ValueError(f"{path}: {bad[0] if bad else 'a weight'} holds NaN/Inf values; refused")
    if lora is not None:
        init_lora_(model, seed)
    return model.eval()


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict, gathered to rank 0's CPU (every rank must call this; the others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded(model: torch.nn.Module, state: dict[str, torch.Tensor], lora=None) -> torch.nn.Module:
    """A plain (unsharded) copy of minicwac's `model` holding `state` (from `full_state`), for saving; with the
    same LoRA adapters (`core.lora.LoRASettings`) if it has some."""
    with torch.device("meta"):
        plain = type(model)(model.config, device="meta")
        if lora is not None:
            from ..core.lora import add_lora
            add_lora(plain, lora)
    if plain.config.tie_word_embeddings:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    plain.load_state_dict(state, assign=True)
    if plain.config.tie_word_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    return plain.eval()


def _tensors(model, opt) -> dict:
    """What a sharded checkpoint holds: the weights' and the AdamW states' shards (tensors only)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    weights = get_model_state_dict(model)
    if model.config.tie_word_embeddings:  # the head is the embeddings' tensor: safetensors refuses it twice, and
        weights.pop("lm_head.weight", None)  # reading the embeddings fills both
    return {"model": weights, "optim": get_optimizer_state_dict(model, opt)["state"]}


def save_sharded(path: Path, model, opt, proc: Process, meta: dict) -> None:
    """Write the resumable checkpoint `path`: every rank its shards, rank 0 state.json (meta + param groups).
    It is written beside `path` and renamed into place by rank 0, so an interrupted save leaves the old one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    tmp = path.with_name(f".{path.name}.tmp")
    if proc.main and tmp.exists():
        shutil.rmtree(tmp)  # our own leftover of an interrupted save
    dist.barrier()
    dcp.save(_tensors(model, opt), storage_writer=dcp.HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    groups = get_optimizer_state_dict(model, opt)["param_groups"]
    if proc.main:  # the format and the world size: a resume on another number of ranks reads them
        (tmp / "state.json").write_text(json.dumps({**meta, "format": "sharded", "world_size": proc.world_size,
                                                    "param_groups": groups}))
        replace_folder(tmp, path)
    dist.barrier()


def load_sharded(path: Path, model, opt) -> dict:
    """Load the weights and the AdamW states of a `save_sharded` checkpoint into `model` and `opt` (each rank its
    shards; written by any number of ranks, read by any number, one process without a process group included:
    torch.distributed.checkpoint reshards); returns its state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    meta = json.loads((path / "state.json").read_text())
    state = _tensors(model, opt)  # the layout to read into (AdamW states created if the optimizer has none yet)
    with warnings.catch_warnings():  # one process (no process group) reads every rank's shards: what we want
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(path)))
    if model.config.tie_word_embeddings:  # the head is the embeddings' tensor (left out by `_tensors`)
        state["model"]["lm_head.weight"] = state["model"]["model.embed_tokens.weight"]
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, {"state": state["optim"], "param_groups": meta["param_groups"]})
    return meta


def load_whole(model, opt, params: dict, state: dict, groups: list[dict]) -> None:
    """A one-process checkpoint (whole tensors: the parameters by name, `opt.state_dict()`'s AdamW state and param
    groups by parameter index) into a sharded model and its optimizer: every rank keeps its own rows."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    name = {p: n for n, p in model.named_parameters()}
    fqn = [name[p] for g in opt.param_groups for p in g["params"]]  # state_dict() numbers them in this order
    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, params, options=whole)
    set_optimizer_state_dict(model, opt, {"state": {fqn[i]: st for i, st in state.items()},
                                          "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]}
                                                           for g in groups]}, options=whole)


def barrier() -> None:
    dist.barrier()


def close() -> None:
    """Leave the process group (the end of a torchrun process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def run_local(fn, world_size: int, *args) -> None:
    """Run fn(proc, *args) in `world_size` new CPU processes on this machine (gloo, a free local port), as torchrun
    would start them: for tests and benchmarks. `fn` must be a module-level function; results go through files."""
    import torch.multiprocessing as mp
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, start_method="spawn")


def free_port() -> int:
    """A TCP port on this machine that nothing listens on (for a local process group)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    proc = init("cpu")
    try:
        fn(proc, *args)
        # every rank done before any leaves: a rank that tears its gloo connections down while another still
        # finishes (rank 0 writing a file after a gather) was seen to abort now and then under load
        dist.barrier()
    finally:
        close()


def max_over_ranks(x: float) -> float:
    """The largest of every rank's `x` (e.g. the weight-side error measured on each rank's shards)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)
