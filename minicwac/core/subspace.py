"""The weight side of CWAC: the safety subspace of each target linear layer, and the exact constraint W S = W0 S.

    X  = inputs of a target linear (e.g. model.layers.3.mlp.down_proj) while the aligned model reads harmful prompts
    C  = X^T X / n                      (in x in, accumulated in float64 batch by batch)
    S  = top-k eigenvectors of C        (in x k): the directions harmful prompts use; k holds `energy` of trace(C)
    after every optimizer step:  W <- W - (W S - W0S) S^T     with W0S = W0 S stored (out x k), not W0

The projection removes exactly the part of the update that acts on S, whatever the optimizer did (AdamW's
per-coordinate scaling and weight decay included), so (W - W0) S = 0 after every step. Projecting only the
gradient is not enough under Adam: see `project_grad_` and notebook 04.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import prompt_batches
from .files import atomic_folder, read_json, recover
from .hooks import capture, model_device

DEFAULT_TARGETS = (r"model\.layers\.\d+\.mlp\.down_proj",)  # [paper]: every MLP down-projection
ALL_LINEARS = (r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",)


def target_names(model: torch.nn.Module, patterns=DEFAULT_TARGETS) -> list[str]:
    """Names of the nn.Linear modules whose full name matches one of the regex `patterns`."""
    rx = [re.compile(p) for p in patterns]
    # in module order, which is the blocks' forward order; the subspace keeps it
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and any(r.fullmatch(n) for r in rx)]
    if not names:
        raise ValueError(f"no linear layer matches {list(patterns)} (e.g. 'model.layers.0.mlp.down_proj')")
    return names


@torch.no_grad()
def input_covariance(model, seqs: list[list[int]], names: list[str], pad_id: int, skip_ids=(),
                     batch_size: int = 32, progress: bool = False,
                     skip_prefix: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """C = X^T X / n (float64) of the inputs of each module in `names`, over every kept token of `seqs`.

    Streams: only one batch of activations is alive at a time. The forward stops after the last target.
    Returns ({name: C}, n tokens)."""
    model.eval()
    # the target that runs last (modules are registered in forward order): the blocks above it never run
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    last = max(names, key=order.__getitem__)
    C: dict[str, torch.Tensor] = {}  # name -> running sum of x^T x, (in, in)
    n = 0  # kept tokens so far
    batches = prompt_batches(seqs, pad_id, model_device(model), batch_size, skip_ids, skip_prefix)
    for ids, keep in tqdm(batches, desc="covariance", total=math.ceil(len(seqs) / batch_size), disable=not progress):
        with capture(model, names, what="input", stop_after=last) as acts:
            model(ids)  # acts[name]: the input of each target, (B, T, in)
        for name in names:
            # float64: the sum runs over every calibration token, and the small eigenvalues decide the rank
            x = acts[name][keep].double()  # (tokens, in)
            C[name] = C[name] + x.T @ x if name in C else x.T @ x  # (in, in)
        n += int(keep.sum())
    if n == 0:
        raise ValueError("no tokens to compute the covariance on (every sequence empty or skipped)")
    return {k: v / n for k, v in C.items()}, n


def eigh_desc(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors (columns) of a symmetric PSD matrix."""
    evals, evecs = torch.linalg.eigh(C)  # ascending
    # clamp: round-off can leave tiny negative eigenvalues on a PSD matrix
    return evals.flip(0).clamp(min=0), evecs.flip(1)


def svd_basis(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The SVD view of the same thing: right singular vectors of X (n x in) are C's eigenvectors and
    s^2 / n its eigenvalues. Returns (s^2 / n, V) in descending order."""
    _, s, Vh = torch.linalg.svd(X.double(), full_matrices=False)  # X = U diag(s) Vh, so C = V diag(s^2 / n) V^T
    return s ** 2 / X.shape[0], Vh.T


def randomized_eigh(C: torch.Tensor, r: int, q: int | None = None, niter: int = 4,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r eigenpairs of a PSD matrix by a randomized range finder (q >= 2r probes, niter >= 4 power steps).

    For big layers (a 14336-wide down_proj) where a full eigh per layer is too slow."""
    q = max(2 * r, q or 0)
    if niter < 4:
        raise ValueError(f"niter={niter}, expected >= 4 (fewer power steps miss the tail of slow spectra)")
    q = min(q, C.shape[0])
    Q = torch.randn(C.shape[0], q, dtype=C.dtype, device=C.device, generator=generator)  # (in, q) random probes
    Q, _ = torch.linalg.qr(C @ Q)  # (in, q): an orthonormal basis of what C does to the probes
    # power steps: each product with C weights the top eigenvectors more; QR after each keeps the columns from
    # all collapsing onto the first one
    for _ in range(niter):
        Q, _ = torch.linalg.qr(C @ Q)
    evals, V = eigh_desc(Q.T @ C @ Q)  # q x q: the Rayleigh-Ritz step
    return evals[:r], (Q @ V)[:, :r]  # (r,), (in, r): the Ritz vectors back in the input space


def rank_for_energy(evals: torch.Tensor, energy: float, total: float | None = None) -> int:
    """Smallest k whose top-k eigenvalues hold `energy` of the total (trace(C) unless given)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy={energy}, expected a fraction in (0, 1]")
    total = float(evals.sum()) if total is None else total
    if total <= 0:
        return 0
    cum = torch.cumsum(evals.double(), 0) / total  # cum[i]: the share held by the top i + 1 eigenvalues
    hit = (cum >= energy - 1e-6).nonzero()  # tolerance: float32 eigenvalues round a share of 0.99 to 0.98999
    return int(hit[0]) + 1 if len(hit) else len(evals)


@dataclass
class Subspace:
    """Per target weight: S (in x k, orthonormal columns) and W0S = W0 S (out x k); `cfg` says how it was made."""

    S: dict[str, torch.Tensor]  # keyed by module name, e.g. "model.layers.0.mlp.down_proj"
    W0S: dict[str, torch.Tensor]  # W0 itself is not kept: (out x k) instead of (out x in)
    cfg: dict = field(default_factory=dict)
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)  # eigenvalues of C (descending), for plots

    def to(self, device) -> "Subspace":
        # the spectra stay where they are: only plots read them
        return Subspace({k: v.to(device) for k, v in self.S.items()}, {k: v.to(device) for k, v in self.W0S.items()},
                        dict(self.cfg), self.spectra)

    def matching(self, patterns) -> "Subspace":
        """`subset` of the layers whose full name matches one of the regex `patterns` (none matching: an error)."""
        names = [n for n in self.S if any(re.fullmatch(p, n) for p in patterns)]
        if not names:
            raise ValueError(f"the subspace holds no layer matching {', '.join(patterns)} (it has {len(self.S)} "
                             f"layers, e.g. {next(iter(self.S), None)!r})")
        return self.subset(names)

    def subset(self, names: list[str]) -> "Subspace":
        """The same constraint on fewer layers (e.g. the down_proj entries of a subspace of every linear)."""
        missing = [n for n in names if n not in self.S]
        if missing:
            raise ValueError(f"the subspace has no layer {missing[0]!r}; it has {len(self.S)} layers "
                             f"(e.g. {next(iter(self.S))!r})")
        # the cfg's ranks then list the kept layers only
        return Subspace({n: self.S[n] for n in names}, {n: self.W0S[n] for n in names},
                        {**self.cfg, "ranks": {n: self.cfg.get("ranks", {}).get(n) for n in names}},
                        {n: self.spectra[n] for n in names if n in self.spectra})

    def _targets(self, model):
        """(name, module, S) for every target, its weight's shape checked against S and W0S."""
        modules = dict(model.named_modules())
        for name, S in self.S.items():
            if name not in modules:
                raise ValueError(f"subspace layer {name!r} is not in the model")
            W = modules[name].weight  # (out, in); sharded: its global shape
            if W.shape[1] != S.shape[0] or W.shape[0] != self.W0S[name].shape[0]:
                raise ValueError(f"{name}.weight {tuple(W.shape)}, subspace expects "
                                 f"({self.W0S[name].shape[0]}, {S.shape[0]})")
            yield name, modules[name], S

    def biases(self, model) -> list[torch.nn.Parameter]:
        """The biases of the target layers (GPT-2 and Qwen2 have some). (W - W0) S = 0 keeps W x for inputs x in
        the subspace, but a changed bias would still move those outputs, so CWAC keeps these frozen."""
        modules = dict(model.named_modules())
        return [modules[n].bias for n in self.S if getattr(modules.get(n), "bias", None) is not None]

    def shard(self, model) -> "Subspace":
        """The same constraint for a model whose weights are sharded by rows (FSDP2's `fully_shard`, `minicwac.io.dist`):
        W0S is split by the same rows as each weight (a DTensor laid out like it); S stays whole on every rank.
        Row i of W S - W0S needs only row i of W, so every projection then runs on the local shard, no
        communication."""
        from torch.distributed.tensor import DTensor, distribute_tensor
        S_, W0S = {}, {}
        for name, m, S in self._targets(model):
            W = m.weight
            if not hasattr(W, "device_mesh"):
                raise ValueError(f"{name}.weight is not sharded (a DTensor); shard the model first")
            dev = W.to_local().device  # beside the shards: the CPU when they are offloaded
            # every rank holds W0S: each keeps its own rows, no communication
            d = distribute_tensor(self.W0S[name].detach().to(W.device_mesh.device_type), W.device_mesh, W.placements,
                                  src_data_rank=None)
            W0S[name] = DTensor.from_local(d.to_local().to(dev), W.device_mesh, W.placements, shape=d.shape,
                                           stride=d.stride())
            S_[name] = S.to(dev)  # (in, k) whole: every row of W meets all of S
        return Subspace(S_, W0S, dict(self.cfg), self.spectra)

    @torch.no_grad()
    def project_(self, model) -> None:
        """The weight constraint: W <- W - (W S - W0S) S^T for every target (in the subspace's float dtype); on
        row-sharded weights, on each rank's rows."""
        for name, m, S in self._targets(model):
            if hasattr(m, "lora_A"):  # LoRA (W0 frozen): A <- A - (A S) S^T, so (W - W0) S = 0
                project_out_(_local(m.lora_A), S)  # (r, in)
                continue
            W, W0S = _local(m.weight), _local(self.W0S[name])  # (out, in), (out, k): this rank's rows
            S, W0S = S.to(W.device), W0S.to(W.device)  # no-ops unless the weights are offloaded to the CPU
            # In S's dtype, whatever the weight's: a bf16 weight rounds only the result, when it is written back.
            Wf = W.to(S.dtype)  # (out, in)
            # W S - W0S (out, k) is how far the layer's response to the subspace has moved. Taking it off along
            # S^T puts it back exactly (S^T S = I, so the new W S is W0S) and leaves W v unchanged for every
            # input v orthogonal to S (S^T v = 0): the task learns freely there.
            W.copy_(Wf - (Wf @ S - W0S) @ S.T)

    @torch.no_grad()
    def project_grad_(self, model) -> None:
        """Remove the gradient's component on S: g <- g - (g S) S^T (what the paper does; not exact under Adam)."""
        for _, m, S in self._targets(model):
            W = getattr(m, "lora_A", m.weight)  # with LoRA, A's gradient
            if W.grad is not None:  # None: not trained, or not used by this step's loss
                # A plain SGD step on this g would keep W S fixed. Adam's per-coordinate scaling and weight decay
                # do not, so on its own this is not exact (notebook 04 measures the gap); project_ is.
                project_out_(_local(W.grad), S)  # (out, in)

    @torch.no_grad()
    def leak(self, model, reference) -> dict[str, float]:
        """||(W - W0) S|| / ||W - W0|| per target: the share of the update that reached the safety subspace."""
        ref = dict(reference.named_modules())
        out = {}
        for name, m, S in self._targets(model):
            dW = (m.weight - ref[name].weight).to(S.dtype)  # (out, in): the whole update
            # (out, k): its part that acts on S; 0 under the weight constraint, ~sqrt(k / in) for a random update
            out[name] = float((dW @ S).norm() / dW.norm().clamp(min=1e-30))
        return out

    @torch.no_grad()
    def ws_error(self, model) -> float:
        """max over targets of ||W S - W0S|| / ||W0S||: 0 on the model the subspace was made from, and on every
        model the weight constraint has kept. With LoRA, W is the effective W0 + scale B A. On row-sharded weights:
        over this rank's rows of every target."""
        out = 0.0
        for n, m, S in self._targets(model):
            A = getattr(m, "lora_A", None)
            A = A.full_tensor() if hasattr(A, "full_tensor") else A  # every rank gathers A (r x in): a collective
            W, W0S = _local(m.weight), _local(self.W0S[n])
            if not W.numel():  # a rank may hold no rows of a small matrix
                continue
            S, W0S = S.to(W.device), W0S.to(W.device)
            err = W.to(S.dtype) @ S - W0S  # (out, k)
            if A is not None:  # LoRA: the effective weight is W + scale B A
                # B (out, r) @ (A S) (r, k): A S first, never the (out, in) product B A
                err = err + m.scale * _local(m.lora_B).to(S.dtype) @ (A.to(S.device, S.dtype) @ S)
            out = max(out, float(err.norm() / W0S.norm().clamp(min=1e-30)))  # the worst target
        return out

    def ranks(self) -> dict[str, tuple[int, int]]:
        """{name: (k, in)}."""
        return {n: (S.shape[1], S.shape[0]) for n, S in self.S.items()}

    def save(self, path: str | Path) -> None:
        """`subspace.safetensors` (name.weight.S, name.weight.W0S) + `cfg.json`, written to a temporary folder first."""
        tensors = {}  # one flat key per tensor: NAME.weight.S, NAME.weight.W0S, NAME.weight.evals
        for n in self.S:
            tensors[f"{n}.weight.S"] = self.S[n].contiguous().cpu()
            tensors[f"{n}.weight.W0S"] = self.W0S[n].contiguous().cpu()
            if n in self.spectra:
                tensors[f"{n}.weight.evals"] = self.spectra[n].float().contiguous().cpu()
        with atomic_folder(path) as tmp:  # an interrupted save never leaves half a folder behind
            save_file(tensors, str(tmp / "subspace.safetensors"))
            (tmp / "cfg.json").write_text(json.dumps(self.cfg, indent=2))

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "Subspace":
        path = Path(path)
        recover(path)  # finish or undo a save that was interrupted while it swapped folders
        for f in ("subspace.safetensors", "cfg.json"):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path / f} not found: a subspace folder has subspace.safetensors and cfg.json")
        cfg = read_json(path / "cfg.json", "a subspace's config (a JSON object)")
        try:
            tensors = load_file(str(path / "subspace.safetensors"), device=str(device))
        except Exception as e:  # noqa: BLE001 -- safetensors raises several types for a corrupt file
            raise ValueError(f"{path} is not a readable subspace folder ({type(e).__name__}: {e})") from None
        # "model.layers.3.mlp.down_proj.weight.S" -> "model.layers.3.mlp.down_proj"
        S = {k[:-len(".weight.S")]: v for k, v in tensors.items() if k.endswith(".weight.S")}
        W0S = {k[:-len(".weight.W0S")]: v for k, v in tensors.items() if k.endswith(".weight.W0S")}
        if set(S) != set(W0S) or not S:
            raise ValueError(f"{path}/subspace.safetensors: expected a .weight.S and a .weight.W0S per layer, "
                             f"got {sorted(tensors)[:4]}")
        for n in S:  # a tampered or foreign file would otherwise switch the constraint off without a word
            check_basis(S[n], W0S[n], f"{path}/subspace.safetensors: {n}")
        # optional: the layers saved with a spectrum
        evals = {k[:-len(".weight.evals")]: v for k, v in tensors.items() if k.endswith(".weight.evals")}
        return cls(S, W0S, cfg, evals)


# How far S^T S may be from I. The projection W <- W - (W S - W0S) S^T leaves W S - W0S = (W S - W0S)(I - S^T S):
# it restores W S = W0S only for orthonormal columns (a zero S restores nothing, an S scaled by 2 overshoots by 3x
# every step). Eigenvectors saved in float32 are off by about 1e-8 (1e-7 with the product in float32) at widths up
# to 8192; 1e-4 leaves a margin of 1000 and is the bound the weights are held to at load (`Kit.load`).
ORTHONORMAL_TOL = 1e-4


def orthonormal_error(S: torch.Tensor) -> float:
    """max |S^T S - I| over the entries, in float64 (S: in x k); 0 for k = 0."""
    if S.shape[1] == 0:  # rank 0: a layer whose inputs were all zero, nothing to check
        return 0.0
    S = S.double()
    return float((S.T @ S - torch.eye(S.shape[1], dtype=S.dtype, device=S.device)).abs().max())


def check_basis(S: torch.Tensor, W0S: torch.Tensor, where: str) -> None:
    """S (in x k) with orthonormal columns and W0S (out x k) beside it, else a ValueError naming `where`."""
    if S.ndim != 2 or W0S.ndim != 2 or S.shape[1] != W0S.shape[1] or not S.is_floating_point():
        raise ValueError(f"{where}: S is {tuple(S.shape)} {S.dtype}, W0S {tuple(W0S.shape)}; expected float "
                         "matrices (in, k) and (out, k) with the same k")
    err = orthonormal_error(S)
    if not err <= ORTHONORMAL_TOL:  # NaN too
        raise ValueError(f"{where}: S is not orthonormal (max |S^T S - I| = {err:.3g}, expected <= "
                         f"{ORTHONORMAL_TOL:g}); the file was changed or not written by minicwac: calibrate again")


def project_out_(x: torch.Tensor, S: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """x <- x - (x S) S^T in place: every row of x (rows, in) loses its component in the span of S's orthonormal
    columns (in, k). Computed in `dtype` (None: S's dtype), written back in x's own dtype.

    The one projection of the weight side: a gradient (`Subspace.project_grad_`), a LoRA A (`Subspace.project_`,
    `lora.constrain_peft_`)."""
    S = S.to(x.device, dtype or S.dtype)  # (in, k)
    xf = x.to(S.dtype)  # (rows, in)
    x.copy_(xf - (xf @ S) @ S.T)  # (rows, k) @ (k, in): the part of each row in the subspace, taken off


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def prompts_hash(seqs: list[list[int]]) -> str:
    # recorded in cfg.json: which calibration prompts made a saved subspace
    return hashlib.sha256(json.dumps(seqs).encode()).hexdigest()[:16]


def compute_subspace(model, seqs: list[list[int]], pad_id: int, *, patterns=DEFAULT_TARGETS,
                     energy: float = 0.99, k: int | None = None, skip_ids=(), skip_prefix: int = 0,
                     batch_size: int = 32, randomized_above: int = 8192, dtype: torch.dtype = torch.float32,
                     model_folder: str | None = None, progress: bool = False) -> Subspace:
    """The safety subspace of `model` (the aligned model) on token sequences `seqs` (chat-formatted harmful prompts).

    Rank: a fixed `k`, else the smallest k holding `energy` of trace(C). Layers wider than `randomized_above`
    use `randomized_eigh` (doubling the probe count until the energy is reached)."""
    if k is not None and k < 0:
        raise ValueError(f"k={k}, expected >= 0")
    names = target_names(model, patterns)
    C, n = input_covariance(model, seqs, names, pad_id, skip_ids, batch_size, progress, skip_prefix)
    modules = dict(model.named_modules())
    S, W0S, ranks, spectra = {}, {}, {}, {}
    for name in names:
        Cn = C[name]  # (in, in), float64
        d = Cn.shape[0]
        if not float(Cn.diagonal().sum()) > 0:  # all inputs zero on these tokens: no direction to protect
            warnings.warn(f"{name}: trace(C) = 0 on the {n} calibration tokens (its inputs are all zero), so it gets "
                          "rank 0 and stays unconstrained; check the layer or leave it out of the targets",
                          stacklevel=2)
        if d > randomized_above:
            # the top r eigenpairs only; the energy is measured against the full trace, so when the top r do not
            # reach it the rank is not known yet: double r and try again (the same seed: reproducible)
            total, r = float(Cn.diagonal().sum()), min(d, k or 256)
            while True:
                evals, evecs = randomized_eigh(Cn, r, generator=torch.Generator(Cn.device).manual_seed(0))
                kk = k if k is not None else rank_for_energy(evals, energy, total)
                if k is not None or float(evals[:kk].sum()) >= (energy - 1e-6) * total or r >= d:
                    break
                r = min(d, 2 * r)
        else:
            evals, evecs = eigh_desc(Cn)  # (in,), (in, in)
            kk = k if k is not None else rank_for_energy(evals, energy)
        kk = min(kk, d)  # a fixed k above the layer's width: every direction
        spectra[name] = evals.float().cpu()  # for plots (randomized: the top r only)
        Sk = evecs[:, :kk].to(dtype)  # (in, k): the top-k eigenvectors, orthonormal columns
        S[name] = Sk
        W0S[name] = modules[name].weight.detach().to(dtype) @ Sk  # (out, in) @ (in, k) -> (out, k)
        ranks[name] = [kk, d]
    # how the subspace was made and on which prompts: saved with it as cfg.json
    cfg = {"energy": None if k is not None else energy, "k": k, "targets": list(patterns), "ranks": ranks,
           "n_tokens": n, "skip_prefix": skip_prefix, "n_prompts": len(seqs), "prompts_sha256": prompts_hash(seqs),
           "model": model_folder}
    return Subspace(S, W0S, cfg, spectra)
