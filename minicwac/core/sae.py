"""A TopK sparse autoencoder (SAE) on one residual-stream layer: the activation side of CWAC reads its latents.

    pre   = ReLU((s x - b_dec) W_enc + b_enc)       (d_sae,)  s: one scalar so that E||s x||^2 = d_in
    z     = TopK(pre)                               keep the k largest, zero the rest
    x_hat = (z W_dec + b_dec) / s                   W_dec rows have unit norm

Recipe (field practice, docs/method.md#4-activation-side-safety-latents-of-an-sae): MSE loss plus an AuxK loss
that lets dead latents reconstruct the residual error; decoder rows renormalised after each step with the
gradient component parallel to them removed before it; b_dec initialised at the data mean or geometric median;
parameters and loss in fp32. At save the scale s is folded into the weights, so a saved SAE takes raw
activations.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import prompt_batches
from .files import atomic_folder, read_json, recover
from .hooks import block_name, logits_of, model_device, residual


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    k: int  # latents kept per token (L0 = k)
    layer: int  # the SAE reads the residual stream after this many blocks: hooks.residual(model, ids, layer)
    aux_k: int | None = None  # dead latents used by the AuxK loss (default d_in // 2, at most d_sae)
    aux_coef: float = 1 / 32
    dead_tokens: int = 20_000  # a latent that has not fired for this many tokens is dead

    def __post_init__(self):
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k={self.k}, expected 1..d_sae={self.d_sae}")
        if self.d_in < 1 or self.layer < 0:
            raise ValueError(f"d_in={self.d_in} and layer={self.layer} must be >= 1 and >= 0")


class SAELoss(NamedTuple):
    """One training batch's loss (`SAE.loss`), its terms and the latent statistics `train_sae` tracks."""

    loss: torch.Tensor  # fvu + aux_coef * aux: what training minimises
    fvu: torch.Tensor  # the reconstruction term
    aux: torch.Tensor | None  # the AuxK term (None: no dead latent, or aux_coef = 0)
    z: torch.Tensor  # (B, d_sae) the batch's sparse latents
    since_fired: torch.Tensor  # (d_sae,) tokens since each latent last fired, this batch counted
    dead: torch.Tensor  # (d_sae,) bool: latents silent for more than cfg.dead_tokens tokens


class SAE(nn.Module):
    """TopK SAE with SAELens names: W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in)."""

    def __init__(self, cfg: SAEConfig, device=None, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=g)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(device))
        self.W_enc = nn.Parameter(W_dec.T.clone().to(device))  # encoder starts as the decoder's transpose
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device))
        self.register_buffer("scale", torch.ones((), device=device))  # the input normalisation s

    def pre_acts(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """ReLU encoder values before TopK, (..., d_sae) or only the latents `idx` (..., len(idx))."""
        h = x.float() * self.scale - self.b_dec  # (..., d_in): normalised, then centred on b_dec
        if idx is None:
            return torch.relu(h @ self.W_enc + self.b_enc)
        return torch.relu(h @ self.W_enc[:, idx] + self.b_enc[idx])  # only the columns the loss needs

    def topk(self, pre: torch.Tensor) -> torch.Tensor:
        v, i = pre.topk(self.cfg.k, dim=-1)  # (..., k): the k largest values and their latents
        return torch.zeros_like(pre).scatter_(-1, i, v)  # (..., d_sae): those k in place, every other latent 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The sparse latents z (feature_acts), (..., d_sae)."""
        return self.topk(self.pre_acts(x))

    def decode(self, z: torch.Tensor, normalised: bool = False) -> torch.Tensor:
        """x_hat (..., d_in) from latents z (..., d_sae); normalised=True: in the space s x that training uses."""
        x_hat = z @ self.W_dec + self.b_dec  # (..., d_sae) @ (d_sae, d_in)
        return x_hat if normalised else x_hat / self.scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    def loss(self, x: torch.Tensor, since_fired: torch.Tensor) -> SAELoss:
        """The training loss on a batch of activations x (B, d_in): the batch FVU of the reconstruction, plus
        aux_coef times the AuxK term when some latents are dead. since_fired (d_sae,): tokens since each latent
        last fired, before this batch (the updated counts come back in the result)."""
        xn = x.float() * self.scale  # (B, d_in): the loss compares in the normalised space s x
        pre = self.pre_acts(x)  # (B, d_sae)
        z = self.topk(pre)  # (B, d_sae), k non-zeros per row
        err = xn - self.decode(z, normalised=True)  # (B, d_in): what the reconstruction missed
        # the batch FVU (squared error over the batch's variance): scale-free, so one lr fits any d_in
        fvu = (err ** 2).sum(-1).mean() / ((xn - xn.mean(0)) ** 2).sum(-1).mean()
        # a latent that fired on any token of the batch starts counting again; the others age by B tokens
        since_fired = torch.where((z != 0).any(0), torch.zeros_like(since_fired), since_fired + len(x))
        dead = since_fired > self.cfg.dead_tokens
        # AuxK only while there is a dead latent to bring back
        aux = self.aux_loss(pre, err.detach(), dead) if self.cfg.aux_coef > 0 and dead.any() else None
        return SAELoss(fvu if aux is None else fvu + self.cfg.aux_coef * aux, fvu, aux, z, since_fired, dead)

    def aux_loss(self, pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """AuxK: the FVU of the reconstruction error err (B, d_in) by the top aux_k dead latents alone, from their
        pre-TopK values pre (B, d_sae). The error comes in detached: a fixed target for the dead latents."""
        ka = min(self.cfg.aux_k, int(dead.sum()))  # no more latents than are dead
        v, i = pre.masked_fill(~dead, 0.0).topk(ka, dim=-1)  # (B, ka): each token's strongest dead latents
        # (B, d_sae) @ (d_sae, d_in); no b_dec: the main reconstruction holds it, this term models what is left
        err_hat = torch.zeros_like(pre).scatter_(-1, i, v) @ self.W_dec
        # over the error's own variance, like the main term: scale-free too
        return ((err - err_hat) ** 2).sum(-1).mean() / ((err - err.mean(0)) ** 2).sum(-1).mean().clamp(min=1e-12)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Before the optimizer step: remove from each decoder row's gradient its component along that row."""
        W, g = self.W_dec, self.W_dec.grad  # (d_sae, d_in) each
        # (g_i . W_i) W_i per row i: with ||W_i|| = 1, the part of the step that would only change the row's
        # norm, which normalize_decoder_ undoes anyway; removed here, it does not reach Adam's moments either
        g -= (g * W).sum(1, keepdim=True) * W

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """After the optimizer step: every decoder row back to unit norm."""
        # TopK ranks latents by their values z_i; those measure the contributions z_i W_dec[i] alike only when
        # every row has the same norm (and the norm cannot grow while z shrinks)
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))

    @torch.no_grad()
    def fold_scale_(self) -> "SAE":
        """Fold s into the weights: afterwards the SAE takes raw activations with scale 1 (same outputs)."""
        s = self.scale.clone()
        # pre = ReLU((s x - b_dec) W_enc + b_enc) = ReLU((x - b_dec / s) (s W_enc) + b_enc)
        self.W_enc.mul_(s)
        self.b_dec.div_(s)
        # x_hat = (z W_dec + b_dec) / s = z (W_dec / s) + b_dec / s, with the new b_dec
        self.W_dec.div_(s)
        self.scale.fill_(1.0)
        return self

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """`sae.safetensors` (scale folded in) + `cfg.json`, written atomically."""
        # a CPU copy is folded: this SAE keeps its scale (training may go on, its outputs are the same either way)
        folded = SAE(self.cfg, device="cpu")
        folded.load_state_dict({k: v.detach().cpu() for k, v in self.state_dict().items()})
        folded.fold_scale_()
        tensors = {k: v.contiguous() for k, v in folded.state_dict().items() if k != "scale"}  # s = 1: not saved
        with atomic_folder(path) as tmp:
            save_file(tensors, str(tmp / "sae.safetensors"))
            (tmp / "cfg.json").write_text(json.dumps({**asdict(self.cfg), **(extra or {})}, indent=2))

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "SAE":
        path = Path(path)
        recover(path)
        for f in ("sae.safetensors", "cfg.json"):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path / f} not found: an SAE folder has sae.safetensors and cfg.json")
        d = read_json(path / "cfg.json", "an SAE's config (a JSON object)")
        try:
            # cfg.json may hold more than the config (save's `extra`): only SAEConfig's fields are read
            cfg = SAEConfig(**{k: d[k] for k in SAEConfig.__dataclass_fields__ if k in d})
            tensors = load_file(str(path / "sae.safetensors"))
        except Exception as e:  # noqa: BLE001 -- bad JSON, missing fields, corrupt safetensors
            raise ValueError(f"{path} is not a readable SAE folder ({type(e).__name__}: {e})") from None
        sae = cls(cfg)
        want = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in),
                "b_dec": (cfg.d_in,)}
        for k, shape in want.items():
            if k not in tensors or tuple(tensors[k].shape) != shape:
                got = tuple(tensors[k].shape) if k in tensors else "missing"
                raise ValueError(f"{path}/sae.safetensors: {k} is {got}, expected {shape} from cfg.json")
        sae.load_state_dict({**tensors, "scale": torch.ones(())})  # saved folded: raw activations in
        return sae.to(device)


# ---------------------------------------------------------------- data


@torch.no_grad()
def harvest(model, seqs: list[list[int]], layer: int, pad_id: int, skip_ids=(), batch_size: int = 32,
            progress: bool = False) -> torch.Tensor:
    """Residual-stream activations after `layer` blocks for every kept token of `seqs`: (n_tokens, hidden), fp32 on CPU.

    Padding and `skip_ids` (pass the BOS id: its activation is an outlier) are dropped."""
    model.eval()
    out = []
    batches = prompt_batches(seqs, pad_id, model_device(model), batch_size, skip_ids)
    for ids, keep in tqdm(batches, desc="harvest", total=math.ceil(len(seqs) / batch_size), disable=not progress):
        x = residual(model, ids, layer)  # (B, T, hidden)
        out.append(x[keep].float().cpu())  # (kept tokens, hidden)
    return torch.cat(out)


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of x."""
    m = x.mean(0)  # (d,) the start
    for _ in range(iters):
        # a mean weighted by 1 / distance: far points (outlier tokens) pull on it less than they pull on the mean
        w = 1.0 / (x - m).norm(dim=1).clamp(min=eps)  # (n,); eps: a point sitting on m
        new = (w[:, None] * x).sum(0) / w.sum()  # (d,)
        if (new - m).norm() < 1e-6 * m.norm().clamp(min=1.0):
            return new
        m = new
    return m


# ---------------------------------------------------------------- metrics


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def l0(z: torch.Tensor) -> float:
    """Mean number of non-zero latents per token."""
    return float((z != 0).float().sum(-1).mean())


def dead_fraction(z: torch.Tensor) -> float:
    """Share of latents that never fire on the tokens of z (n_tokens, d_sae)."""
    return float(((z != 0).sum(0) == 0).float().mean())


@torch.no_grad()
def sae_metrics(sae: SAE, x: torch.Tensor, batch_size: int = 4096) -> dict:
    """L0, FVU and dead fraction of `sae` on activations x (n, d_in), plus each latent's firing frequency."""
    dev = sae.W_dec.device
    x_hat, fired, nz = [], torch.zeros(sae.cfg.d_sae, device=dev), 0.0
    for xb in x.split(batch_size):
        xh, z = sae(xb.to(dev))  # (b, d_in), (b, d_sae)
        x_hat.append(xh.cpu())  # kept on the CPU: the FVU is taken on all of x at once (its variance, its mean)
        fired += (z != 0).float().sum(0)  # (d_sae,): tokens each latent fired on
        nz += float((z != 0).float().sum())
    return {"l0": nz / len(x), "fvu": fvu(x.float(), torch.cat(x_hat)),
            "dead_fraction": float((fired == 0).float().mean()), "density": (fired / len(x)).cpu()}


@torch.no_grad()
def ce_recovered(model, sae: SAE, seqs: list[list[int]], pad_id: int, batch_size: int = 32) -> dict:
    """LM loss with the SAE's reconstruction spliced into the residual stream after `sae.cfg.layer` blocks.

    recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), where CE_zero replaces that residual by zeros.
    Every next-token target of the sequences counts (padding excluded)."""
    name = block_name(model, sae.cfg.layer)
    modules = dict(model.named_modules())
    mode = {"v": "clean"}  # which of the three forwards is running; the hook reads it

    def splice(module, inputs, output):
        if mode["v"] == "clean":
            return None  # a forward hook that returns None leaves the output as it is
        x = output[0] if isinstance(output, tuple) else output  # older transformers blocks return tuples
        new = sae(x)[0].to(x.dtype) if mode["v"] == "sae" else torch.zeros_like(x)  # (B, T, hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n = 0
    h = modules[name].register_forward_hook(splice)
    try:
        model.eval()
        for ids, keep in prompt_batches(seqs, pad_id, model_device(model), batch_size):
            tgt = ids[:, 1:].masked_fill(~keep[:, 1:], -100)  # (B, T-1): the next token, -100 on padding
            for m in totals:  # the same batch three times: clean, through the SAE, zeroed
                mode["v"] = m
                logits = logits_of(model(ids))[:, :-1].float()  # (B, T-1, V): the prediction of each next token
                # summed here and divided by the token count at the end: a mean per token, not per batch
                totals[m] += float(torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="sum"))
            n += int((tgt != -100).sum())
    finally:
        h.remove()  # also on an error: the model never keeps the hook
    ce = {k: v / n for k, v in totals.items()}
    # 1: splicing in the SAE costs nothing; 0: as bad as deleting the residual stream there
    ce["recovered"] = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"])
    return ce


# ---------------------------------------------------------------- training


def train_sae(x: torch.Tensor, d_sae: int, k: int, layer: int, *, steps: int = 3000, batch_size: int = 1024,
              lr: float = 1e-3, b_dec_init: str = "median", aux_k: int | None = None, aux_coef: float = 1 / 32,
              dead_tokens: int = 20_000,
              eval_every: int = 100, seed: int = 0, device="cpu", progress: bool = True) -> tuple[SAE, dict]:
    """Train a TopK SAE on activations x (n, d_in). Returns (sae with scale set, history of loss/l0/fvu/dead)."""
    if b_dec_init not in ("mean", "median"):
        raise ValueError(f"b_dec_init={b_dec_init!r}, expected 'mean' or 'median'")
    x = x.float()  # (n, d_in)
    d_in = x.shape[1]
    # the AuxK default: d_in // 2 dead latents per token, at least k and at most d_sae
    cfg = SAEConfig(d_in, d_sae, k, layer, aux_k=aux_k if aux_k is not None else min(d_sae, max(k, d_in // 2)),
                    aux_coef=aux_coef, dead_tokens=dead_tokens)
    sae = SAE(cfg, device, seed)
    with torch.no_grad():
        # s with E ||s x||^2 = d_in: every layer and model trains on activations of one size, so one lr fits
        scale = math.sqrt(d_in / float((x ** 2).sum(1).mean()))
        sae.scale.fill_(scale)
        # b_dec starts at the centre of the data (in the normalised space), from a sample of at most 8192 tokens;
        # the geometric median is less pulled by outlier tokens than the mean
        sample = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:8192]] * scale
        sae.b_dec.copy_((sample.mean(0) if b_dec_init == "mean" else geometric_median(sample)).to(device))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(d_sae, device=device)  # tokens since each latent last fired
    g = torch.Generator().manual_seed(seed + 1)  # the batches' draws
    hist = {"step": [], "loss": [], "l0": [], "fvu": [], "dead_fraction": []}
    bar = tqdm(range(steps), desc="sae", disable=not progress, mininterval=1.0)
    for step in bar:
        # B tokens drawn at random (with replacement): the rows of x come prompt by prompt, and neighbouring
        # tokens of one prompt are alike
        xb = x[torch.randint(len(x), (batch_size,), generator=g)].to(device)  # (B, d_in)
        out = sae.loss(xb, since_fired)
        since_fired = out.since_fired
        out.loss.backward()
        # The decoder rows stay at unit norm: the gradient loses its part along each row before the step, and
        # the rows are rescaled after it (Adam's per-coordinate step still changes their norms a little).
        sae.remove_parallel_grad_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        if step % eval_every == 0 or step == steps - 1:  # the training batch's own figures: no extra forward
            hist["step"].append(step)
            hist["loss"].append(out.loss.item())
            hist["l0"].append(l0(out.z))
            hist["fvu"].append(out.fvu.item())
            hist["dead_fraction"].append(float(out.dead.float().mean()))
            bar.set_postfix(fvu=f"{hist['fvu'][-1]:.3f}", dead=f"{hist['dead_fraction'][-1]:.2f}")
    return sae.eval(), hist
