"""Models for micro-expression recognition.

Two families share one calling convention (``forward_batch(batch)`` + ``inputs``) so the
training loop needs no model-specific code:

- ``SequenceTransformer``: the method we reproduce. Per time step, the motion of every
  AU-based ROI is embedded, an adaptive spatial attention weighs the ROIs and pools them into
  one token, a millisecond time embedding is added, and a pre-norm transformer over the whole
  sequence classifies from a CLS token.
- ``ApexCNN``: an onset-apex baseline (STSTNet / OFF-ApexNet style) on one dense flow map.

Batch contract (see the preprocessing cache and mer/batches.py):
    x     float32 (B, T, R, C)  per-step, per-ROI motion channels
    times float32 (B, T)        ms since the first frame
    mask  bool    (B, T)        True for real steps, False for padding
    apex  float32 (B, 3, S, S)  flow u, v, strain between first frame and apex
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

__all__ = [
    "MERModel",
    "SequenceTransformer",
    "ApexCNN",
    "MODELS",
    "DEFAULT_MODEL",
    "MaskedMotionModel",
    "build_model",
    "model_settings",
]


# ---------------------------------------------------------------------------------------------
# common calling convention


class MERModel(nn.Module):
    """Base class: ``forward_batch`` feeds ``heads`` the batch entries named in ``inputs``.

    ``heads`` returns every output of the model by name: ``emotion`` logits (B, K) and, for a
    model built with ``n_aus > 0``, ``au`` logits (B, V) of the auxiliary multi-label AU head."""

    inputs: tuple[str, ...] = ()

    def _args(self, batch: Mapping[str, Tensor]) -> list[Tensor]:
        missing = [k for k in self.inputs if k not in batch]
        if missing:
            raise KeyError(
                f"{type(self).__name__} needs batch keys {list(self.inputs)}; "
                f"missing {missing} (got {sorted(batch)})"
            )
        return [batch[k] for k in self.inputs]

    def heads(self, *args: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward_heads(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every head's logits from a collated batch dict; only the keys in ``inputs`` are used."""
        return self.heads(*self._args(batch))

    def forward_batch(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Emotion logits (B, K) from a collated batch dict."""
        return self.forward_heads(batch)["emotion"]


# ---------------------------------------------------------------------------------------------
# sequence transformer building blocks


class ROIEmbedding(nn.Module):
    """Embed each ROI's motion vector: a linear map of its C channels + a learned ROI identity.

    By default the linear map is ROI-specific (weights (R, C, D)): the same (u, v) means
    different things at a brow and at a mouth corner, and after the ROI attention pools the
    tokens, a shared map would leave only the weighted mean motion vector (a C-dim quantity)
    in the step token. With uniform ROI weights the per-ROI map reduces (up to a 1/R scale)
    to the authors' ``Linear(R*C -> D)`` on the flattened step. ``shared=True`` uses one map for all ROIs.
    """

    def __init__(self, n_rois: int, n_channels: int, dim: int, shared: bool = False):
        super().__init__()
        self.shared = shared
        self.weight = nn.Parameter(torch.empty(1 if shared else n_rois, n_channels, dim))
        self.identity = nn.Parameter(torch.empty(n_rois, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-scaled weights (pixel-scale inputs must not vanish); small identities."""
        c, d = self.weight.shape[1:]
        nn.init.trunc_normal_(self.weight, std=(2 / (c + d)) ** 0.5)
        nn.init.trunc_normal_(self.identity, std=0.02)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, R, C) -> (B, T, R, D)
        weight = self.weight.expand(x.shape[2], -1, -1) if self.shared else self.weight
        return torch.einsum("btrc,rcd->btrd", x, weight) + self.identity


class TimeEmbedding(nn.Module):
    """Sinusoids of the timestamp in ms, then a linear layer.

    Working in ms (not step index) makes 200/300/500 fps clips resampled on one ms grid look
    alike, and unlike a learned position table it has no maximum length. Periods are spaced
    geometrically from ``min_period_ms`` to ``max_period_ms``.
    """

    def __init__(self, dim: int, n_freqs: int = 16, min_period_ms: float = 20.0,
                 max_period_ms: float = 4000.0):
        super().__init__()
        periods = torch.logspace(math.log10(min_period_ms), math.log10(max_period_ms), n_freqs)
        self.register_buffer("omega", 2 * math.pi / periods, persistent=False)
        self.proj = nn.Linear(2 * n_freqs, dim)

    def forward(self, times: Tensor) -> Tensor:  # (B, T) -> (B, T, dim)
        phase = times.unsqueeze(-1) * self.omega
        return self.proj(torch.cat((phase.sin(), phase.cos()), dim=-1))


class ROIAttentionPool(nn.Module):
    """Adaptive spatial attention: score each ROI token given the step's context, pool by softmax.

    The score MLP sees the token and the mean of all ROI tokens at that step, so a region's
    weight depends on what the rest of the face is doing (the paper's "attention to local
    movements"). ``drop_mask`` (True = ROI hidden) removes ROIs from the softmax.
    """

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.score = nn.Sequential(
            nn.LayerNorm(2 * dim), nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )

    def forward(self, tokens: Tensor, drop_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # tokens (B, T, R, D) -> pooled (B, T, D), weights (B, T, R)
        context = tokens.mean(dim=2, keepdim=True).expand_as(tokens)
        logits = self.score(torch.cat((tokens, context), dim=-1)).squeeze(-1)
        if drop_mask is not None:
            logits = logits.masked_fill(drop_mask, float("-inf"))
        weights = logits.softmax(dim=-1)
        pooled = torch.einsum("btr,btrd->btd", weights, tokens)
        return pooled, weights


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, dim), nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


MATH_ATTENTION = False
"""Compute attention explicitly instead of with ``scaled_dot_product_attention`` when training
on CUDA: the fused kernels' backward with a padding mask (memory-efficient attention) is not
deterministic. Set by ``mer.devices.set_deterministic``."""


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with a key-padding mask.

    Uses ``scaled_dot_product_attention`` unless the attention weights are requested, in which
    case it computes them explicitly (same maths) and returns them (B, H, N, N). Dropout on the
    attention weights is off by default: on CPU it costs a third of a training step for no
    measurable gain at this size (``dropout`` still applies to the output projection).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int | None = None,
                 dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        dim_head = dim_head or max(dim // heads, 1)
        inner = heads * dim_head
        self.heads, self.scale, self.attn_dropout = heads, dim_head ** -0.5, attn_dropout
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, key_mask: Tensor,
                return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        # x (B, N, D); key_mask (B, N) True = may be attended to
        q, k, v = rearrange(self.to_qkv(self.norm(x)), "b n (qkv h d) -> qkv b h n d",
                            qkv=3, h=self.heads)
        allowed = rearrange(key_mask, "b j -> b 1 1 j")
        p = self.attn_dropout if self.training else 0.0
        if return_attention or (MATH_ATTENTION and x.is_cuda and torch.is_grad_enabled()):
            sim = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
            attn = sim.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            out = torch.einsum("bhij,bhjd->bhid", F.dropout(attn, p, self.training), v)
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)")), attn


class Transformer(nn.Module):
    """``depth`` pre-norm blocks (attention + MLP, residual) and a final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dropout=dropout),
                           FeedForward(dim, int(dim * mlp_ratio), dropout)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, key_mask: Tensor,
                return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        last_attn = None
        for i, (attn, ff) in enumerate(self.layers):
            want = return_attention and i == len(self.layers) - 1
            out, a = attn(x, key_mask, return_attention=want)
            x = x + out
            x = x + ff(x)
            last_attn = a if want else last_attn
        return self.norm(x), last_attn


# ---------------------------------------------------------------------------------------------
# the method we reproduce


class SequenceTransformer(MERModel):
    """Full-sequence transformer over the motion of local facial regions (ROIs).

    Per step: a linear embedding of each ROI's motion + a learned ROI identity embedding,
    adaptive ROI attention pools the R tokens into one, a ms time embedding is added; then a CLS
    token and a ``depth``-layer pre-norm transformer over time (padding masked out as keys);
    LayerNorm + linear on CLS.

    Padded steps are zeroed on input and never attended to, so they cannot change the logits.
    ``roi_dropout`` hides each ROI for a whole clip with that probability during training (at
    least one ROI always stays), so the model cannot lean on one region only.
    """

    inputs = ("x", "times", "mask")

    def __init__(
        self,
        n_rois: int,
        n_channels: int,
        n_classes: int,
        dim: int = 64,
        depth: int = 5,
        heads: int = 8,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
        emb_dropout: float = 0.0,
        roi_dropout: float = 0.0,
        shared_roi_embed: bool = False,
        time_scale_ms: float = 4000.0,
        min_period_ms: float = 20.0,
        n_time_freqs: int = 16,
        n_aus: int = 0,
    ):
        super().__init__()
        if not 0.0 <= roi_dropout < 1.0:
            raise ValueError(f"roi_dropout must be in [0, 1), got {roi_dropout}")
        self.n_rois, self.n_channels, self.roi_dropout, self.dim = n_rois, n_channels, roi_dropout, dim

        self.roi_embed = ROIEmbedding(n_rois, n_channels, dim, shared=shared_roi_embed)
        self.roi_pool = ROIAttentionPool(dim)
        self.time_embed = TimeEmbedding(dim, n_time_freqs, min_period_ms, time_scale_ms)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, mlp_ratio, dropout)
        self.head = nn.Linear(dim, n_classes)
        self.au_head = nn.Linear(dim, n_aus) if n_aus else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ViT-style: trunc-normal (std 0.02) for linear weights and CLS, zero biases.

        The ROI embedding keeps its own (Xavier-scaled) init: it reads a few pixel-scale
        channels, and a 0.02 scale there would make motion tokens vanish next to the rest.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.roi_embed.reset_parameters()

    def _roi_drop_mask(self, b: int, device: torch.device) -> Tensor | None:
        if not (self.training and self.roi_dropout > 0):
            return None
        drop = torch.rand(b, 1, self.n_rois, device=device) < self.roi_dropout
        return drop & ~drop.all(dim=-1, keepdim=True)  # never hide every ROI

    def encode(self, x: Tensor, times: Tensor, mask: Tensor, return_attention: bool = False,
               hidden_rois: Tensor | None = None, hidden_steps: Tensor | None = None,
               step_token: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The transformer's output sequence (B, 1 + T, D) (CLS first), the ROI weights (B, T, R)
        and, with ``return_attention``, the last layer's attention.

        For masked pretraining: ``hidden_rois`` (B, T, R) True = that ROI is hidden at that step
        (left out of the ROI attention; at least one stays), ``hidden_steps`` (B, T) True = the
        whole step is replaced by ``step_token`` (D,) before the time embedding is added."""
        b, t, r, c = x.shape
        if (r, c) != (self.n_rois, self.n_channels):
            raise ValueError(f"x has {r} ROIs x {c} channels per step; "
                             f"model built for {self.n_rois} x {self.n_channels}")
        mask = mask.bool()
        x = x.masked_fill(~mask[..., None, None], 0.0)  # padding may hold garbage / NaN
        times = times.masked_fill(~mask, 0.0)

        tokens = self.roi_embed(x)  # (B, T, R, D)
        drop = self._roi_drop_mask(b, x.device)
        if hidden_rois is not None:  # (their inputs are zeroed by the caller: nothing leaks at a fully hidden step)
            drop = hidden_rois if drop is None else hidden_rois | drop
            drop = drop & ~drop.all(dim=-1, keepdim=True)
        steps, roi_w = self.roi_pool(tokens, drop)
        if hidden_steps is not None:
            steps = torch.where(hidden_steps[..., None], step_token.to(steps.dtype), steps)
        steps = steps + self.time_embed(times)

        cls = repeat(self.cls_token, "1 1 d -> b 1 d", b=b)
        seq = self.emb_dropout(torch.cat((cls, steps), dim=1))
        key_mask = F.pad(mask, (1, 0), value=True)  # CLS is always a valid key
        seq, attn = self.transformer(seq, key_mask, return_attention)
        return seq, roi_w, attn

    def heads(self, x: Tensor, times: Tensor, mask: Tensor) -> dict[str, Tensor]:
        cls = self.encode(x, times, mask)[0][:, 0]
        out = {"emotion": self.head(cls)}
        if self.au_head is not None:
            out["au"] = self.au_head(cls)
        return out

    def forward(self, x: Tensor, times: Tensor, mask: Tensor, return_attention: bool = False
                ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Logits (B, K); with ``return_attention`` also ``{"roi": (B, T, R), "time": (B, T)}``.

        ``roi``: spatial weights per step (sum to 1 over ROIs on real steps, 0 on padding).
        ``time``: last-layer attention of CLS to each step, averaged over heads and renormalised
        over the steps (CLS's share on itself is left out): sums to 1 over real steps, 0 on padding.
        """
        if not return_attention:
            return self.heads(x, times, mask)["emotion"]
        seq, roi_w, attn = self.encode(x, times, mask, return_attention=True)
        logits = self.head(seq[:, 0])
        mask = mask.bool()
        time_w = attn[:, :, 0, 1:].mean(dim=1)  # CLS query -> step keys, (B, T)
        time_w = time_w / time_w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        roi_w = roi_w.masked_fill(~mask[..., None], 0.0)
        return logits, {"roi": roi_w, "time": time_w}


# ---------------------------------------------------------------------------------------------
# onset-apex baseline


class ConvBranch(nn.Module):
    """Conv(k) -> BN -> ReLU -> MaxPool(2) -> Conv(3) -> BN -> ReLU: one receptive-field size."""

    def __init__(self, in_channels: int, width: int, kernel: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ApexCNN(MERModel):
    """Onset-apex baseline in the spirit of STSTNet / OFF-ApexNet.

    Parallel shallow conv branches with different kernel sizes on the (u, v, strain) flow map
    between the first frame and the apex, concatenated, pooled to a coarse ``pool x pool`` grid
    (keeps *where* on the face the motion is), dropout, linear. Works for any map size S.
    """

    inputs = ("apex",)

    def __init__(self, n_classes: int, in_channels: int = 3, width: int = 8,
                 kernels: tuple[int, ...] = (3, 5, 7), pool: int = 4, dropout: float = 0.5, n_aus: int = 0):
        super().__init__()
        self.branches = nn.ModuleList(ConvBranch(in_channels, width, k) for k in kernels)
        self.pool_size = pool
        self.dropout = nn.Dropout(dropout)
        n_feats = width * len(kernels) * pool * pool
        self.head = nn.Linear(n_feats, n_classes)
        self.au_head = nn.Linear(n_feats, n_aus) if n_aus else None

    def _pool(self, feats: Tensor) -> Tensor:
        """Average-pool to pool x pool cells. A plain avg_pool2d when the map divides evenly (its
        CUDA backward is deterministic, AdaptiveAvgPool2d's is not); adaptive pooling otherwise."""
        h, w = feats.shape[-2:]
        p = self.pool_size
        if h % p == 0 and w % p == 0:
            return F.avg_pool2d(feats, (h // p, w // p))
        return F.adaptive_avg_pool2d(feats, p)

    def heads(self, apex: Tensor) -> dict[str, Tensor]:
        feats = torch.cat([branch(apex) for branch in self.branches], dim=1)
        z = self.dropout(rearrange(self._pool(feats), "b c h w -> b (c h w)"))
        out = {"emotion": self.head(z)}
        if self.au_head is not None:
            out["au"] = self.au_head(z)
        return out

    def forward(self, apex: Tensor) -> Tensor:
        return self.heads(apex)["emotion"]


# ---------------------------------------------------------------------------------------------
# registry


def _sequence(n_rois: int, n_channels: int, n_classes: int, **kw) -> nn.Module:
    return SequenceTransformer(n_rois, n_channels, n_classes, **kw)


def _apex_cnn(n_rois: int, n_channels: int, n_classes: int, **kw) -> nn.Module:
    return ApexCNN(n_classes, **kw)  # the apex map has its own channels (in_channels)


class MaskedMotionModel(nn.Module):
    """Self-supervised pretraining of a SequenceTransformer: hide some steps (replaced by a learned
    token) and some ROIs (left out of the ROI attention), reconstruct their motion from the rest.

    ``reconstruct`` returns (B, T, R, C) predicted features from the encoder's step outputs; the
    loss is taken on what was hidden. The encoder's weights then initialise a classifier."""

    def __init__(self, encoder: SequenceTransformer):
        super().__init__()
        self.encoder = encoder
        self.step_token = nn.Parameter(torch.zeros(encoder.dim))
        self.decoder = nn.Sequential(nn.LayerNorm(encoder.dim),
                                     nn.Linear(encoder.dim, encoder.n_rois * encoder.n_channels))

    def reconstruct(self, x: Tensor, times: Tensor, mask: Tensor, hidden_rois: Tensor,
                    hidden_steps: Tensor) -> Tensor:
        seq, _, _ = self.encoder.encode(x * ~hidden_rois[..., None], times, mask, hidden_rois=hidden_rois,
                                        hidden_steps=hidden_steps, step_token=self.step_token)
        out = self.decoder(seq[:, 1:])
        return rearrange(out, "b t (r c) -> b t r c", r=self.encoder.n_rois)


DEFAULT_MODEL = "sequence"

# name -> (model class, factory taking the data-derived sizes + size settings)
MODELS: dict[str, tuple[type[MERModel], Callable[..., nn.Module]]] = {
    "sequence": (SequenceTransformer, _sequence),
    "apex_cnn": (ApexCNN, _apex_cnn),
}

_DATA_ARGS = {"self", "n_rois", "n_channels", "n_classes", "n_aus"}


def model_settings(name: str) -> list[str]:
    """The size settings (keyword arguments) model ``name`` accepts from config."""
    cls = _lookup(name)[0]
    return [p for p in inspect.signature(cls.__init__).parameters if p not in _DATA_ARGS]


def _lookup(name: str) -> tuple[type[MERModel], Callable[..., nn.Module]]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {sorted(MODELS)}")
    return MODELS[name]


def build_model(name: str, n_rois: int, n_channels: int, n_classes: int, n_aus: int = 0,
                **kwargs) -> nn.Module:
    """Build a registered model from the data's sizes (n_aus: AUs of the auxiliary head, 0 =
    none) and the config's size settings.

    Unknown ``name`` or unknown keyword arguments raise ``ValueError`` naming the valid ones.
    """
    _, factory = _lookup(name)
    valid = model_settings(name)
    bad = sorted(set(kwargs) - set(valid))
    if bad:
        raise ValueError(f"model {name!r} got unknown setting(s) {bad}; valid settings: {valid}")
    return factory(n_rois, n_channels, n_classes, n_aus=n_aus, **kwargs)
