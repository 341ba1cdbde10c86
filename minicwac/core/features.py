"""The activation side of CWAC: pick safety-critical SAE latents, cache their baseline values z0, and the loss

    L_safety = mean over harmful prompt tokens of  sum over selected latents  (z - z0)^2

where z comes from the *current* model run only up to the SAE layer (a hook on the block's output ends the
forward there, so any model with Hugging Face names works), and z0 from the aligned model, computed once. The
squared norm is summed over the latents, not averaged (averaging divides the constraint by m).

Readouts (what z is), all of shape (..., m):
  "pre"        ReLU encoder values of the selected latents before TopK (default: a latent that leaves the TopK
               still has a gradient pulling it back)
  "post"       the sparse post-TopK latents (needs the full encoder)
  "directions" projections on difference-of-means directions (harmful minus harmless), no SAE at all
  "residual"   the whole residual vector at that layer (a reference point, not the method)
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch

from .data import prompt_batches
from .hooks import block_name, capture, model_device, residual
from .sae import SAE

READOUTS = ("pre", "post", "directions", "residual")


@torch.no_grad()
def latent_means(model, sae: SAE, seqs: list[list[int]], pad_id: int, skip_ids=(), values: str = "pre",
                 batch_size: int = 32, skip_prefix: int = 0) -> torch.Tensor:
    """Mean (over kept tokens of `seqs`) of every latent's pre-TopK ("pre") or post-TopK ("post") value: (d_sae,)."""
    total, n = 0.0, 0
    for ids, keep in prompt_batches(seqs, pad_id, model_device(model), batch_size, skip_ids, skip_prefix):
        x = residual(model, ids, sae.cfg.layer)[keep]  # (kept tokens, hidden)
        z = sae.pre_acts(x) if values == "pre" else sae.encode(x)  # (kept tokens, d_sae)
        total = total + z.sum(0)  # (d_sae,): summed batch by batch, one batch of latents alive at a time
        n += len(z)
    return total / n


def score_latents(model, sae: SAE, harmful: list[list[int]], harmless: list[list[int]] | None, pad_id: int,
                  skip_ids=(), how: str = "harmful", values: str = "post", skip_prefix: int = 0) -> torch.Tensor:
    """Score each latent: its mean activation on harmful prompts ("harmful"), or that minus its mean on
    harmless prompts ("contrast"). Means of post-TopK values by default: a latent scores only where it fires."""
    if how not in ("harmful", "contrast"):
        raise ValueError(f"how={how!r}, expected 'harmful' or 'contrast'")
    s = latent_means(model, sae, harmful, pad_id, skip_ids, values, skip_prefix=skip_prefix)  # (d_sae,)
    # "contrast": a latent that fires as much on harmless prompts (the chat format, common words) scores near 0
    # scores that are all 0 would make the selection arbitrary (topk of ties): refused, not passed on
    if not s.abs().max() > 0:
        raise ValueError("no SAE latent fires on the harmful prompts (every mean activation is 0): no latent to "
                         "select; check the SAE and its layer")
    if how == "contrast":
        if not harmless:
            raise ValueError("how='contrast' needs harmless prompts")
        d = s - latent_means(model, sae, harmless, pad_id, skip_ids, values, skip_prefix=skip_prefix)
        # harmless prompts that read like the harmful ones (the same prompts, in any order) leave only rounding;
        # 1e-5 of the largest mean is far above float32 rounding of a sum, far below any real contrast
        if not d.abs().max() > 1e-5 * s.abs().max():
            raise ValueError(f"every latent's contrast score (harmful minus harmless mean) is 0 (at most "
                             f"{float(d.abs().max()):.2g}): the harmless prompts read like the harmful ones, so no "
                             "latent is specific to harm; give harmless prompts that differ, or none")
        s = d
    return s


def check_latents(m: int | str) -> int | str:
    """m: a positive number of latents or "firing"."""
    if m != "firing" and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"m={m!r}, expected a positive number of latents or 'firing'")
    return m


def check_sae_layer(layer: int | None, n_layers: int, depth: float = 0.5) -> int:
    """The SAE layer, checked against the model's depth; None: after a share `depth` of the blocks, rounded down
    (0.5: the middle block, n_layers // 2), and at least after the first."""
    if layer is None:
        return max(1, int(depth * n_layers + 1e-9))  # + 1e-9: 0.8 * 30 is 24.000000000000004, 0.7 * 10 is 7 - 1e-15
    if not 1 <= layer <= n_layers:
        raise ValueError(f"sae_layer={layer}, expected 1..{n_layers} (the residual stream after that many blocks)")
    return layer


def select_latents(scores: torch.Tensor, m: int | str = 100) -> torch.Tensor:
    """Indices of the top-m latents by score, or with m="firing" every latent with a positive score."""
    if check_latents(m) == "firing":
        idx = (scores > 0).nonzero().flatten()
        return idx[scores[idx].argsort(descending=True)]  # best first, as topk returns them
    if m > len(scores):
        warnings.warn(f"m={m} latents asked for, but the SAE has {len(scores)}: all {len(scores)} are used",
                      stacklevel=2)
    return scores.topk(min(m, len(scores))).indices


@torch.no_grad()
def mean_residuals(model, seqs: list[list[int]], layers: list[int], pad_id: int, skip_ids=(), skip_prefix: int = 0,
                   batch_size: int | None = None) -> torch.Tensor:
    """The mean residual stream after each of `layers` blocks over the kept tokens of `seqs`: (len(layers), hidden),
    float32. One forward per batch reads every layer; batch_size=None: every sequence in one batch."""
    names = [block_name(model, layer) for layer in layers]
    total, n = None, 0
    for ids, keep in prompt_batches(seqs, pad_id, model_device(model), batch_size, skip_ids, skip_prefix):
        # the forward ends after the deepest layer asked for: the blocks above it never run
        with capture(model, names, stop_after=block_name(model, max(layers))) as acts:
            model(ids)  # acts[name]: (B, T, hidden)
        s = torch.stack([acts[name][keep].float().sum(0) for name in names])  # (L, hidden): summed over tokens
        total = s if total is None else total + s
        n += int(keep.sum())
    return total / n  # the mean over every kept token, whatever the batching


@torch.no_grad()
def mean_diff_directions(model, layer: int | list[int], groups: list[list[list[int]]], harmless: list[list[int]],
                         pad_id: int, skip_ids=(), skip_prefix: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """Unit difference-of-means directions, one per group of harmful prompts (e.g. one per category, or a single
    group: the refusal direction): the group's mean residual minus the mean residual on harmless prompts.
    Returns (hidden, n_groups) at one `layer`, (len(layer), hidden, n_groups) for a list of layers."""
    layers = [layer] if isinstance(layer, int) else list(layer)
    # the harmless mean is taken out so that what every prompt shares (the chat format, the residual stream's
    # common offset) cancels: what is left points from ordinary requests towards harmful ones
    base = mean_residuals(model, harmless, layers, pad_id, skip_ids, skip_prefix, batch_size)  # (L, hidden)
    D = torch.stack([mean_residuals(model, g, layers, pad_id, skip_ids, skip_prefix, batch_size) - base
                     for g in groups], -1)  # (L, hidden, G)
    D = D / D.norm(dim=1, keepdim=True).clamp(min=1e-30)  # each column to unit norm
    return D[0] if isinstance(layer, int) else D


def dropout_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose train mode means dropout: `nn.Dropout`, and attention modules with a dropout rate (Hugging
    Face's attention reads `self.training` to decide whether to apply its `attention_dropout`)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Dropout) or any(
        isinstance(getattr(m, a, None), float) and getattr(m, a) > 0 for a in ("attention_dropout", "dropout"))]


@dataclass
class SafetyFeatures:
    """Selected features, their baseline values z0 on a fixed harmful set, and the L_safety regulariser."""

    layer: int  # residual stream after this many blocks
    readout: str  # one of READOUTS
    ids: torch.Tensor  # (N, T) right-padded harmful prompts (the calibration set)
    keep: torch.Tensor  # (N, T) bool: tokens the loss averages over
    z0: torch.Tensor  # (N, T, m) the aligned model's values
    sae: SAE | None = None
    idx: torch.Tensor | None = None  # selected latents (readout pre/post)
    directions: torch.Tensor | None = None  # (hidden, m) (readout directions)

    def readout_of(self, x: torch.Tensor) -> torch.Tensor:
        """z for residual activations x (..., hidden) -> (..., m)."""
        if self.readout == "pre":
            return self.sae.pre_acts(x, self.idx)  # only the m selected encoder columns
        if self.readout == "post":
            # the full encoder: whether a latent survives TopK depends on all the others
            return self.sae.encode(x)[..., self.idx]  # (..., d_sae) -> (..., m)
        if self.readout == "directions":
            return x.float() @ self.directions  # (..., hidden) @ (hidden, m)
        return x.float()  # "residual": m = hidden

    def loss(self, model, batch: torch.Tensor | None = None, n_tokens: int | None = None) -> torch.Tensor:
        """L_safety on the prompts `batch` (indices into the fixed set; all of them if None). n_tokens: divide the
        sum over tokens by this count instead of taking the mean (one rank's part of a global batch)."""
        # z0 was cached once on these same prompts, padded the same way: row i of ids and of z0 match token for
        # token, so the loss needs no alignment, only an index
        ids, keep, z0 = (self.ids, self.keep, self.z0) if batch is None else \
            (self.ids[batch], self.keep[batch], self.z0[batch])  # (B, T), (B, T), (B, T, m)
        T = int(keep.any(0).nonzero().max()) + 1  # drop the padding columns this batch does not need
        ids, keep, z0 = ids[:, :T], keep[:, :T], z0[:, :T]
        # The gradient reaches the model through x only (the SAE is frozen): the embeddings and the first
        # `layer` blocks get one, the blocks above them none. z is read the way z0 was: without dropout and in
        # float32 even inside a bf16-mixed step, so that L_safety is exactly zero at the aligned weights and its
        # early gradient is not rounding noise (the cost: this partial forward is not in bf16).
        off = [m for m in dropout_modules(model) if m.training]
        for m in off:  # only the modules whose train mode means dropout: gradient checkpointing stays as it was
            m.training = False
        try:
            with torch.autocast(ids.device.type, enabled=False):
                x = residual(model, ids, self.layer, grad=True)  # (B, T, hidden): nothing above the SAE layer runs
                z = self.readout_of(x.float())  # (B, T, m)
        finally:
            for m in off:
                m.training = True
        # squared distance to the aligned model's values: summed over the m features (the constraint's strength
        # does not shrink as m grows), averaged over the kept tokens (padding and skipped tokens drop out)
        per_token = ((z - z0) ** 2).sum(-1)[keep]  # (kept tokens,)
        return per_token.mean() if n_tokens is None else per_token.sum() / n_tokens

    @torch.no_grad()
    def rebased(self, model, batch_size: int = 16, rtol: float = 0.05) -> "SafetyFeatures":
        """The same features with z0 read again from `model` through the forward training runs: where that is not
        the float32 forward z0 was cached with (a sharded bf16-mixed run, whose FSDP2 units compute with bf16
        copies of the weights whatever `loss` asks for), L_safety then still starts at 0 instead of at a floor of
        rounding noise. `model` must be the aligned model: a z0 further than `rtol` from the cached one (relative
        norm) is refused. Every rank of a sharded run calls this (its forward is a collective)."""
        z0 = self.read_z0(model, batch_size)
        off = float((z0 - self.z0)[self.keep].norm() / self.z0[self.keep].norm().clamp_min(1e-30))
        if not off <= rtol:
            raise ValueError(f"the model's z0 is {off:.3g} (relative) from the kit's: it is not the aligned model the "
                             f"kit was calibrated on (expected at most {rtol}, rounding)")
        return replace(self, z0=z0)

    @torch.no_grad()
    def read_z0(self, model, batch_size: int | None = None) -> torch.Tensor:
        """`model`'s readout on the fixed prompts, (N, T, m): z0 when `model` is the aligned model (in batches of
        `batch_size` prompts; None: all at once)."""
        n = batch_size or len(self.ids)
        return torch.cat([self.readout_of(residual(model, self.ids[i:i + n], self.layer).float())
                          for i in range(0, len(self.ids), n)])

    def check(self, where: str) -> None:
        """The shapes the loss relies on and latent indices inside the SAE, else a ValueError naming `where` (the
        file they were read from): a bad index would otherwise be an IndexError deep inside the first step."""
        ids, keep, z0 = self.ids, self.keep, self.z0
        if ids.ndim != 2 or keep.shape != ids.shape or z0.ndim != 3 or z0.shape[:2] != ids.shape:
            raise ValueError(f"{where}: ids {tuple(ids.shape)}, keep {tuple(keep.shape)}, z0 {tuple(z0.shape)}; "
                             "expected (N, T), (N, T) and (N, T, m)")
        if not torch.isfinite(z0).all():  # the loss would be NaN from the first step
            raise ValueError(f"{where}: z0 holds NaN or Inf")
        if self.readout in ("pre", "post"):
            idx, d_sae = self.idx, self.sae.cfg.d_sae
            integer = idx is not None and not idx.is_floating_point() and idx.dtype != torch.bool
            if not integer or idx.ndim != 1 or len(idx) != z0.shape[-1]:
                got = "none" if idx is None else f"{tuple(idx.shape)} {idx.dtype}"
                raise ValueError(f"{where}: latent indices idx are {got}; expected {z0.shape[-1]} integers (z0's m)")
            bad = idx[(idx < 0) | (idx >= d_sae)]
            if len(bad):
                raise ValueError(f"{where}: latent index {int(bad[0])} is outside the SAE's {d_sae} latents "
                                 f"(expected 0..{d_sae - 1})")
            if self.sae.cfg.layer != self.layer:
                raise ValueError(f"{where}: the features read layer {self.layer}, their SAE layer "
                                 f"{self.sae.cfg.layer}; expected the same")

    def to(self, device) -> "SafetyFeatures":
        # a new object: the fixed prompts, z0 and the SAE move together with the model
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SafetyFeatures(self.layer, self.readout, mv(self.ids), mv(self.keep), mv(self.z0),
                              None if self.sae is None else self.sae.to(device), mv(self.idx), mv(self.directions))

    @property
    def m(self) -> int:
        return self.z0.shape[-1]


@torch.no_grad()
def safety_features(model, seqs: list[list[int]], pad_id: int, *, readout: str = "pre", sae: SAE | None = None,
                    idx: torch.Tensor | None = None, directions: torch.Tensor | None = None, layer: int | None = None,
                    skip_ids=(), skip_prefix: int = 0) -> SafetyFeatures:
    """Cache z0 = the readout of `model` (the aligned model) on the harmful prompts `seqs`."""
    if readout not in READOUTS:
        raise ValueError(f"readout={readout!r}, expected one of {READOUTS}")
    if readout in ("pre", "post") and (sae is None or idx is None):
        raise ValueError(f"readout={readout!r} needs an SAE and selected latents idx")
    if readout == "directions" and directions is None:
        raise ValueError("readout='directions' needs directions (hidden, m)")
    if layer is None:
        if sae is None:
            raise ValueError("give the layer (or an SAE, whose layer is used)")
        layer = sae.cfg.layer
    if sae is not None:
        sae.requires_grad_(False)  # frozen: L_safety trains the model, never the SAE (no .grad piles up in W_enc)
    if not seqs:
        raise ValueError("no harmful prompts to cache z0 on")
    # one batch: the loss later indexes rows of these same padded tensors, so z0 is stored in their layout
    ids, keep = next(prompt_batches(seqs, pad_id, model_device(model), None, skip_ids, skip_prefix))  # (N, T) each
    sf = SafetyFeatures(layer, readout, ids, keep, torch.empty(0), sae, idx, directions)
    # the same readout the loss applies, on the aligned model: z0 (N, T, m), fixed for the whole fine-tuning
    sf.z0 = sf.read_z0(model)
    return sf
