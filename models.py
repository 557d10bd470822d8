"""I-JEPA from scratch: the vision transformer, masking, predictor and training objective.

Read top to bottom, in the order the method uses each piece:
  1. configuration, with named presets      6. the predictor
  2. patches and positions                  7. masking: which patches are context, which targets
  3. attention by image id, padding skipped 8. the batch: a context stream and a hidden stream
  4. the encoder (a ViT)                    9. I-JEPA: student, EMA teacher, predictor, loss
  5. feature normalisation (the teacher's output -> the regression targets)

One convention runs through the whole file: every token carries the id of the image it belongs
to (`sample`, -1 for padding) and its patch coordinates (`pos` = (row, col)). Attention is only
allowed between tokens with the same sample id, so an ordinary batch (one image per row) and a
packed batch (several images per row, see packing.py) go through the same forward.

Beside this file: studies/ec_ijepa.py extends the model with encoder conditioning,
studies/official_checkpoint.py loads released weights, and train.py owns the optimiser and the
schedules.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass(frozen=True)
class Preset:
    """The sizes of a named model: the encoder's width, depth and heads, then the predictor's."""

    dim: int
    depth: int
    heads: int
    predictor_dim: int
    predictor_depth: int


PRESETS = {
    "micro": Preset(dim=128, depth=4, heads=4, predictor_dim=64, predictor_depth=3),  # CPU-sized
    "tiny": Preset(dim=192, depth=12, heads=3, predictor_dim=384, predictor_depth=6),
    "small": Preset(dim=384, depth=12, heads=6, predictor_dim=384, predictor_depth=6),
    "base": Preset(dim=768, depth=12, heads=12, predictor_dim=384, predictor_depth=6),
}
FEATURE_NORMS = ("layernorm", "dyntanh", "batchnorm", "none")
LOSSES = ("smooth_l1", "mse")
# What follows the predictor's output projection (section 6): nothing (as released), a trainable
# LayerNorm, a parameter-free one, or a parameter-free one after a trainable one.
PREDICTOR_NORMS = ("none", "layernorm", "free", "layernorm-free")


@dataclass(frozen=True)
class ViTConfig:
    dim: int = 192
    depth: int = 12
    heads: int = 3
    patch_size: int = 16
    in_chans: int = 3
    mlp_ratio: float = 4.0
    feature_norm: str = "layernorm"  # decides the encoder's last layer (section 5)

    def __post_init__(self):
        if self.dim % self.heads or self.dim % 4:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads} and by 4")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"unknown feature norm {self.feature_norm!r}; choose one of {FEATURE_NORMS}")


@dataclass(frozen=True)
class JEPAConfig:
    model: str = "micro"  # a key of PRESETS
    patch_size: int = 8
    in_chans: int = 3
    predictor_dim: int | None = None  # None: the preset's
    predictor_depth: int | None = None
    feature_norm: str = "layernorm"  # one of FEATURE_NORMS
    loss: str = "smooth_l1"  # one of LOSSES
    predictor_norm: str = "none"  # one of PREDICTOR_NORMS

    def __post_init__(self):
        if self.model not in PRESETS:
            raise ValueError(f"unknown preset {self.model!r}; choose one of {sorted(PRESETS)}")
        if self.predictor_norm not in PREDICTOR_NORMS:
            raise ValueError(f"unknown predictor norm {self.predictor_norm!r}; choose one of {PREDICTOR_NORMS}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"unknown feature norm {self.feature_norm!r}; choose one of {FEATURE_NORMS}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        heads = PRESETS[self.model].heads  # the predictor shares the encoder's head count
        step = math.lcm(heads, 4)  # whole heads, and sin-cos positions in four equal parts
        if self.predictor_dim is not None and (self.predictor_dim < 1 or self.predictor_dim % step):
            raise ValueError(f"predictor_dim={self.predictor_dim}: must be a positive multiple of {step} "
                             f"for {self.model!r} ({heads} heads; sin-cos positions need a multiple of 4)")
        if self.predictor_depth is not None and self.predictor_depth < 1:
            raise ValueError(f"predictor_depth={self.predictor_depth}: must be at least 1")

    def encoder_config(self) -> ViTConfig:
        p = PRESETS[self.model]
        return ViTConfig(p.dim, p.depth, p.heads, self.patch_size, self.in_chans, feature_norm=self.feature_norm)

    def predictor_config(self) -> ViTConfig:
        p = PRESETS[self.model]
        return ViTConfig(p.predictor_dim if self.predictor_dim is None else self.predictor_dim,
                         p.predictor_depth if self.predictor_depth is None else self.predictor_depth, p.heads,
                         self.patch_size, self.in_chans)


# -----------------------------------------------------------------------------------------------
# 2. Patches and positions


def check_images(images: torch.Tensor, patch_size: int, in_chans: int = 3) -> None:
    """Raise a ValueError that says what was expected unless `images` is (B, C, H, W) on the patch grid."""
    if images.ndim != 4 or images.shape[1] != in_chans:
        raise ValueError(f"expected images of shape (batch, {in_chans}, height, width), "
                         f"got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image sides must be multiples of the patch size {patch_size}, got {h}x{w}; "
                         f"resize or crop to e.g. {h // patch_size * patch_size}x{w // patch_size * patch_size}")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*p*p), tokens in raster order (index = row * W/p + col).

    Each patch is flattened channel-first, so a Linear on it equals the official Conv2d patch
    embedding with kernel = stride = p (its weight reshaped from (D, C, p, p) to (D, C*p*p)).
    """
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(B, h*w, C*p*p) -> (B, C, h*p, w*p), the inverse of `patchify`."""
    B, N, P = patches.shape
    h, w = grid
    p = patch_size
    C = P // (p * p)
    x = patches.reshape(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, w * p)


def grid_coords(h: int, w: int, device=None) -> torch.Tensor:
    """(h*w, 2) integer (row, col) of every patch of an h x w grid, in raster order."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


def sincos_2d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of (row, col) coordinates: (..., 2) -> (..., dim).

    The first dim/2 channels encode the column and the last dim/2 the row; each half is
    [sin(x * w_k) for k < dim/4] followed by [cos(x * w_k)], with w_k = 1 / 10000^(k / (dim/4)).
    On a regular grid this equals the official fixed table, but because it is computed from each
    token's own coordinates it works at any resolution and inside packed sequences.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=pos.device, dtype=torch.float64) / quarter)

    def encode(x):  # (...,) -> (..., dim/2)
        angles = x.to(torch.float64)[..., None] * omega  # (..., dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    return torch.cat([encode(pos[..., 1]), encode(pos[..., 0])], dim=-1).float()


# -----------------------------------------------------------------------------------------------
# 3. Attention by image id, the padding the blocks skip, and the transformer block


def attention_mask(sample: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask from per-token sample ids: (B, L) -> (B, 1, L, L).

    Convention (that of `F.scaled_dot_product_attention`): **True means "may attend"**.
    Query i may attend key j when both belong to the same image (same sample id >= 0).
    Padding (sample id -1) attends only to itself, so that its softmax row is never empty and
    no NaN appears; no real token ever attends to padding. Passing a *padding* mask instead
    (True = pad) would invert this and let every token attend to padding and other images.
    """
    same = sample[:, :, None] == sample[:, None, :]  # (B, L, L)
    real = (sample >= 0)[:, None, :]  # (B, 1, L) keys that are real tokens
    self_only = torch.eye(sample.shape[1], dtype=torch.bool, device=sample.device)
    return ((same & real) | self_only)[:, None]  # (B, 1, L, L), broadcast over heads


def drop_padding(x: torch.Tensor, sample: torch.Tensor) -> tuple:
    """Take out the padding no row needs: tokens (B, L, D) and sample ids (B, L) -> tokens
    (B, L', D) and ids (B, L'), each row's real tokens first and in order, L' the most real tokens
    of any row; and `kept` (B, L'), the slot each token came from (None when nothing is cut).

    A real token never attends to padding (`attention_mask`), so the blocks give real tokens the
    same output either way: this only saves the work done on padding. The teacher sees both streams
    side by side, each padded to the batch's longest, and the predictor's non-target query slots
    are padding, so at the benchmark's configuration (benchmarks/train_step.py) 54 of their 198
    slots are cut (24% of the step's FLOPs). Under torch.compile nothing is cut, so that a packed
    batch keeps one shape and compiles once.
    """
    real = sample >= 0  # (B, L)
    L = sample.shape[1]
    if torch.compiler.is_compiling() or L == 0:
        return x, sample, None
    n = int(real.sum(1).max())
    if n == L:
        return x, sample, None
    kept = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices[:, :n]  # (B, L') real slots first
    return x.gather(1, kept[..., None].expand(-1, -1, x.shape[-1])), sample.gather(1, kept), kept


def restore_padding(x: torch.Tensor, kept, length: int) -> torch.Tensor:
    """Undo `drop_padding`: tokens (B, L', D) back to their slots in (B, length, D); the slots it cut get 0."""
    if kept is None:
        return x
    return x.new_zeros(x.shape[0], length, x.shape[-1]).scatter(1, kept[..., None].expand(-1, -1, x.shape[-1]), x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask):  # x (B, L, D), mask (B, 1, L, L) bool, True = may attend
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads)  # (B, L, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, D/H)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module, blocks: nn.ModuleList) -> None:
    """Every Linear: a normal of std 0.02 truncated at +-2 standard deviations (+-0.04, so the
    measured std is 0.0176), zero bias; LayerNorm 1/0; then each block's residual projections
    (attn.proj, mlp.fc2) divided by sqrt(2 * layer), so that deeper residual streams start no
    larger. (The official training initialises differently: benchmarks/README.md, "What differs".)"""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:  # a parameter-free one has nothing to set
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for layer, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))


# -----------------------------------------------------------------------------------------------
# 4. The encoder


class VisionTransformer(nn.Module):
    """ViT without cls token or head: patch tokens in, patch tokens out.

    `forward` takes flat token sets so that padded and packed batches are the same case:
        patches (B, L, C*p*p), pos (B, L, 2) integer (row, col), sample (B, L) image id, -1 = pad.
    Returns the final tokens (B, L, D), after the encoder's last layer (`feature_norm_layer`), and
    with `return_layers=True` also a list with every block's output tokens (B, L, D), before that
    layer, for probing.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.in_chans * cfg.patch_size ** 2, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = feature_norm_layer(cfg.feature_norm, cfg.dim)
        init_weights(self, self.blocks)

    def embed(self, patches, pos):  # (B, L, C*p*p), (B, L, 2) -> (B, L, D)
        return self.patch_embed(patches) + sincos_2d(pos, self.cfg.dim)

    def transform(self, x, sample, return_layers=False):
        """The blocks and the last layer over embedded tokens x (B, L, D) with sample ids (B, L)."""
        L = x.shape[1]
        x, sample, kept = drop_padding(x, sample)  # (B, L', D): the blocks skip the padding
        mask = attention_mask(sample)
        layers = []
        for block in self.blocks:
            x = block(x, mask)
            layers.append(x)
        out = restore_padding(self.norm(x), kept, L)  # (B, L, D)
        return (out, [restore_padding(t, kept, L) for t in layers]) if return_layers else out

    def forward(self, patches, pos, sample, return_layers=False):
        return self.transform(self.embed(patches, pos), sample, return_layers)

    def image_tokens(self, images):
        """Plain images (B, C, H, W) -> patches (B, N, C*p*p), pos (B, N, 2), sample (B, N), raster order."""
        check_images(images, self.cfg.patch_size, self.cfg.in_chans)
        B, _, H, W = images.shape
        h, w = H // self.cfg.patch_size, W // self.cfg.patch_size
        pos = grid_coords(h, w, images.device).expand(B, -1, -1)  # (B, N, 2)
        sample = torch.arange(B, device=images.device)[:, None].expand(-1, h * w)  # (B, N)
        return patchify(images, self.cfg.patch_size), pos, sample

    def encode(self, images, return_layers=False):
        """Plain images (B, C, H, W) -> tokens (B, N, D) in raster order (and per-block tokens).
        Evaluation calls this, so a subclass that encodes differently (studies/ec_ijepa.py) is
        probed as it encodes."""
        return self(*self.image_tokens(images), return_layers=return_layers)


# -----------------------------------------------------------------------------------------------
# 5. Feature normalisation: from the teacher's last block to the regression targets
#
# One setting, `feature_norm`, decides everything between the teacher's last block and the
# targets. It acts in two places: the encoder's last layer (`feature_norm_layer`, part of both
# encoders) and a step applied to the teacher's output only (`apply_feature_norm`).
#   layernorm  the encoder ends in an affine LayerNorm (as released), then a parameter-free
#              LayerNorm over channels (the original I-JEPA): every target token has the same norm.
#   dyntanh    the encoder ends in DynTanh, which bounds the features without equalising their
#              norms; nothing more.
#   batchnorm  the encoder ends without a norm; each channel is standardised with statistics over
#              the valid target tokens only (padding never enters), of every rank's batch under
#              DistributedDataParallel (as one process would give the whole batch).
#   none       the encoder ends without a norm; its raw output is the target.


class DynTanh(nn.Module):
    """y = tanh(alpha * x), alpha a learnable per-channel vector (initial 0.5, no affine). Unlike
    LayerNorm it bounds the features without giving every token the same norm; the teacher's
    alpha is the EMA of the student's, like every other parameter."""

    def __init__(self, dim: int, init_alpha: float = 0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((dim,), init_alpha))

    def forward(self, x):
        return torch.tanh(self.alpha * x)


def feature_norm_layer(feature_norm: str, dim: int) -> nn.Module:
    """The encoder's last layer for this feature norm."""
    if feature_norm == "layernorm":
        return nn.LayerNorm(dim, eps=1e-6)
    if feature_norm == "dyntanh":
        return DynTanh(dim)
    return nn.Identity()  # batchnorm and none start from the last block's raw output


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """`x` summed, in place, over the processes of a distributed run (DistributedDataParallel);
    `x` itself in a single process. Every rank must call it, in the same order."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


def apply_feature_norm(features: torch.Tensor, valid: torch.Tensor, feature_norm: str) -> torch.Tensor:
    """The teacher's output tokens (B, L, D) -> regression targets (B, L, D); `valid` (B, L) marks
    the tokens that are predicted (batchnorm's statistics come from those alone, on every rank)."""
    if feature_norm == "layernorm":
        return F.layer_norm(features, features.shape[-1:])
    if feature_norm == "batchnorm":  # masked statistics: no data-dependent shapes, so it compiles
        # The sums are over every rank, so the targets do not depend on how a batch is split
        # between processes. Other tokens are selected out, not multiplied by 0 (0 x inf is NaN).
        keep = valid[..., None]  # (B, L, 1)
        n = sum_over_ranks(valid.sum().to(features.dtype)).clamp(min=1)
        mean = sum_over_ranks(torch.where(keep, features, 0.0).sum((0, 1))) / n  # (D,)
        var = sum_over_ranks(torch.where(keep, (features - mean) ** 2, 0.0).sum((0, 1))) / n
        return (features - mean) / torch.sqrt(var + 1e-6)
    return features  # "dyntanh" (already bounded by the encoder's last layer) and "none"


# -----------------------------------------------------------------------------------------------
# 6. The predictor


def predictor_norm_layer(name: str, dim: int) -> nn.Module:
    """The layer after the predictor's output projection, for PREDICTOR_NORMS' `name`."""
    if name == "layernorm":
        return nn.LayerNorm(dim, eps=1e-6)  # trainable scale and shift
    if name == "free":
        return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)  # every prediction: mean 0, variance 1
    if name == "layernorm-free":  # a parameter-free LayerNorm on an output a trainable one already normalised
        return nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False))
    return nn.Identity()


class Predictor(nn.Module):
    """Narrow ViT that predicts the teacher's features at the target positions from the context.

    context (B, Lc, D) with context_pos/context_sample; query_pos (B, Lq, 2), query_sample (B, Lq)
    (-1 where nothing is to be predicted). Each query slot starts as the shared learned mask token
    plus the sin-cos embedding of its position; all queries of an image are predicted in one pass,
    attending to that image's context and its other mask tokens.
    Returns predictions (B, Lq, D), at the query slots only; `out_norm` (PREDICTOR_NORMS) says what
    normalises them after the output projection (none, as released).
    """

    def __init__(self, cfg: ViTConfig, encoder_dim: int, out_norm: str = "none"):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(encoder_dim, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.proj = nn.Linear(cfg.dim, encoder_dim)
        self.out_norm = predictor_norm_layer(out_norm, encoder_dim)
        init_weights(self, self.blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.04, b=0.04)

    def forward(self, context, context_pos, context_sample, query_pos, query_sample):
        Lc = context.shape[1]
        ctx = self.embed(context) + sincos_2d(context_pos, self.cfg.dim)  # (B, Lc, Dp)
        queries = self.mask_token + sincos_2d(query_pos, self.cfg.dim)  # (B, Lq, Dp)
        x = torch.cat([ctx, queries], dim=1)  # (B, Lc + Lq, Dp)
        L = x.shape[1]
        x, sample, kept = drop_padding(x, torch.cat([context_sample, query_sample], dim=1))  # (B, L', Dp)
        mask = attention_mask(sample)
        for block in self.blocks:
            x = block(x, mask)
        x = restore_padding(self.norm(x), kept, L)[:, Lc:]  # (B, Lq, Dp)
        return self.out_norm(self.proj(x))  # (B, Lq, D)


# -----------------------------------------------------------------------------------------------
# 7. Masking: which patches are context, which are targets
#
# A masking is called as masking(h, w, generator) for one image of h x w patches and returns a
# Mask of flat raster indices. Everything is drawn from the given torch.Generator, so a seed
# reproduces every mask.


@dataclass
class Mask:
    context: torch.Tensor  # (Nc,) sorted patch indices the student sees
    target: torch.Tensor  # (Nt,) sorted patch indices to predict, disjoint from context
    blocks: tuple = ()  # multi-block masking: each target block's sorted patch indices (their union is target)


def _uniform(lo: float, hi: float, g: torch.Generator) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _randint(hi_inclusive: int, g: torch.Generator) -> int:
    return int(torch.randint(hi_inclusive + 1, (), generator=g))


@dataclass
class MultiBlockMasking:
    """I-JEPA multi-block masking: `num_targets` target blocks and one large context block from
    which every target patch is removed.

    Each block draws its scale and aspect ratio independently and its corner over every position
    where it fits, so every patch can be a target and context. The context block has the grid's own
    aspect ratio, so that its scale means the same on any grid (a square block on a 4x8 grid could
    cover only 62%). Its sides are whole patches, so the drawn 85-100% is rounded: on small grids
    it covers less (2,000 draws: at least 77% of an 8x8 grid, 74% of 7x7, 84% of 12x12; the whole
    of a 4x4 grid). Every image keeps its own mask. Sampling always terminates: after `attempts` draws
    whose context keeps fewer than `min_context` patches, the draw with the largest context is
    taken and its target blocks are dropped, last first, until the context is large enough (one
    target block of at most 20% inside a context of at least 85% always leaves enough).
    """

    num_targets: int = 4
    target_scale: tuple = (0.15, 0.2)
    target_aspect: tuple = (0.75, 1.5)
    context_scale: tuple = (0.85, 1.0)
    min_context: int = 10  # capped at 10% of the grid on small grids
    attempts: int = 20
    min_grid: int = 4

    def block(self, h, w, scale, aspect, g):
        """A rectangle of about scale*h*w patches with height/width in `aspect`, as an (h, w) bool grid."""
        # aspect None: the grid's own shape, so the context block keeps its scale on any grid
        s, a = _uniform(*scale, g), (h / w if aspect is None else _uniform(*aspect, g))
        bh = min(h, max(1, round(math.sqrt(s * h * w * a))))
        bw = min(w, max(1, round(math.sqrt(s * h * w / a))))
        top, left = _randint(h - bh, g), _randint(w - bw, g)  # inclusive: the last row is reachable
        grid = torch.zeros(h, w, dtype=torch.bool)
        grid[top:top + bh, left:left + bw] = True
        return grid

    def __call__(self, h: int, w: int, g: torch.Generator) -> Mask:
        if h < self.min_grid or w < self.min_grid:
            raise ValueError(f"multi-block masking needs a patch grid of at least "
                             f"{self.min_grid}x{self.min_grid}, got {h}x{w}; use larger images or a smaller patch")
        need = max(1, min(self.min_context, math.ceil(0.1 * h * w)))
        best = None
        for _ in range(self.attempts):
            targets = [self.block(h, w, self.target_scale, self.target_aspect, g)
                       for _ in range(self.num_targets)]
            context = self.block(h, w, self.context_scale, None, g)
            kept = int((context & ~torch.stack(targets).any(0)).sum())
            if best is None or kept > best[2]:
                best = (targets, context, kept)
            if kept >= need:
                break
        targets, context, _ = best
        while len(targets) > 1 and int((context & ~torch.stack(targets).any(0)).sum()) < need:
            targets = targets[:-1]  # the documented fallback
        target = torch.stack(targets).any(0)
        return Mask(context=(context & ~target).flatten().nonzero().squeeze(1),
                    target=target.flatten().nonzero().squeeze(1),
                    blocks=tuple(b.flatten().nonzero().squeeze(1) for b in targets))


@dataclass
class WindowMasking:
    """Window masking (feature-normalisation paper): patches are grouped into k x k windows; a
    context fraction is drawn uniformly from `context_ratio`; that many random windows are the
    context and every other window is a target. (The paper's predictor also subsamples 25% of
    the windows per pass; here every target is predicted.)"""

    window: int = 2
    context_ratio: tuple = (0.25, 0.5)

    def __call__(self, h: int, w: int, g: torch.Generator) -> Mask:
        k = self.window
        if h % k or w % k or (h // k) * (w // k) < 2:
            raise ValueError(f"window masking with {k}x{k} windows needs a patch grid whose sides are "
                             f"multiples of {k} and at least 2 windows, got {h}x{w}")
        wh, ww = h // k, w // k
        n_ctx = min(wh * ww - 1, max(1, round(_uniform(*self.context_ratio, g) * wh * ww)))
        is_ctx = torch.zeros(wh * ww, dtype=torch.bool)
        is_ctx[torch.randperm(wh * ww, generator=g)[:n_ctx]] = True
        # window grid (wh, ww) -> patch grid (h, w): every patch inherits its window's choice
        grid = is_ctx.reshape(wh, ww).repeat_interleave(k, 0).repeat_interleave(k, 1).flatten()
        return Mask(context=grid.nonzero().squeeze(1), target=(~grid).nonzero().squeeze(1))


MASKINGS = {"multiblock": MultiBlockMasking, "window": WindowMasking}


def make_masking(name: str, **kwargs):
    if name not in MASKINGS:
        raise ValueError(f"unknown masking {name!r}; choose one of {sorted(MASKINGS)}")
    return MASKINGS[name](**kwargs)


# -----------------------------------------------------------------------------------------------
# 8. The batch: a context stream and a hidden stream
#
# Each image is cut into two token streams: the *context* stream (the patches the student sees)
# and the *hidden* stream (every other patch; `is_target` marks the masking's targets among them,
# the rest are neither seen by the student nor predicted). Together the two streams hold the whole
# image once, which is what the teacher sees. A batch has rows; a row holds one image (ordinary
# batch) or several (packed): sample ids keep them apart.


@dataclass
class SplitImage:
    """One image cut into its two streams (the unit that batches are built from)."""

    context_patches: torch.Tensor  # (Nc, C*p*p)
    context_pos: torch.Tensor  # (Nc, 2)
    hidden_patches: torch.Tensor  # (Nh, C*p*p) every patch that is not context
    hidden_pos: torch.Tensor  # (Nh, 2)
    is_target: torch.Tensor  # (Nh,) bool: a target of the masking
    grid: tuple  # (h, w) patches
    label: int = -1


def split_image(image: torch.Tensor, patch_size: int, masking, g: torch.Generator, label=-1) -> SplitImage:
    """(C, H, W) image -> SplitImage, with the mask drawn from `masking` and generator `g`."""
    check_images(image[None], patch_size, image.shape[0])
    h, w = image.shape[1] // patch_size, image.shape[2] // patch_size
    mask = masking(h, w, g)
    patches, pos = patchify(image[None], patch_size)[0], grid_coords(h, w)  # (N, P), (N, 2)
    is_context = torch.zeros(h * w, dtype=torch.bool)
    is_context[mask.context] = True
    hidden = (~is_context).nonzero().squeeze(1)
    is_target = torch.zeros(h * w, dtype=torch.bool)
    is_target[mask.target] = True
    return SplitImage(patches[mask.context], pos[mask.context], patches[hidden], pos[hidden],
                      is_target[hidden], (h, w), int(label))


@dataclass
class MaskedBatch:
    """The model's input: rows of context and hidden streams, padded to fixed lengths.

    Sample ids number the images of the batch 0..n_images-1 (-1 = padding); `pos` is each token's
    (row, col) in its own image. A row holds at most `images_per_row` images.
    """

    context_patches: torch.Tensor  # (B, Lc, C*p*p)
    context_pos: torch.Tensor  # (B, Lc, 2)
    context_sample: torch.Tensor  # (B, Lc)
    hidden_patches: torch.Tensor  # (B, Lh, C*p*p)
    hidden_pos: torch.Tensor  # (B, Lh, 2)
    hidden_sample: torch.Tensor  # (B, Lh)
    is_target: torch.Tensor  # (B, Lh) bool, False on padding
    images_per_row: int
    grids: torch.Tensor  # (n_images, 2) patch grid of each image
    labels: torch.Tensor  # (n_images,) -1 where unknown

    @classmethod
    def from_rows(cls, rows: list, context_len: int, hidden_len: int, images_per_row=None):
        """Lay out rows of SplitImages (a list per row) into fixed (rows, context_len) and
        (rows, hidden_len) streams; padding carries sample id -1 and zero pixels."""
        first = next(s for row in rows for s in row)
        B, P = len(rows), first.context_patches.shape[1]
        batch = cls(
            context_patches=torch.zeros(B, context_len, P), context_pos=torch.zeros(B, context_len, 2, dtype=torch.long),
            context_sample=torch.full((B, context_len), -1), hidden_patches=torch.zeros(B, hidden_len, P),
            hidden_pos=torch.zeros(B, hidden_len, 2, dtype=torch.long), hidden_sample=torch.full((B, hidden_len), -1),
            is_target=torch.zeros(B, hidden_len, dtype=torch.bool),
            images_per_row=images_per_row or max(len(row) for row in rows),
            grids=torch.tensor([s.grid for row in rows for s in row]).reshape(-1, 2),
            labels=torch.tensor([s.label for row in rows for s in row], dtype=torch.long))
        sample = 0
        for r, row in enumerate(rows):
            if sum(len(s.context_pos) for s in row) > context_len or sum(len(s.hidden_pos) for s in row) > hidden_len:
                raise ValueError(f"row {r} holds more tokens than the stream lengths {context_len}/{hidden_len}")
            if len(row) > batch.images_per_row:
                raise ValueError(f"row {r} holds {len(row)} images, more than images_per_row={batch.images_per_row}")
            c = h = 0
            for s in row:
                nc, nh = len(s.context_pos), len(s.hidden_pos)
                batch.context_patches[r, c:c + nc] = s.context_patches
                batch.context_pos[r, c:c + nc] = s.context_pos
                batch.context_sample[r, c:c + nc] = sample
                batch.hidden_patches[r, h:h + nh] = s.hidden_patches
                batch.hidden_pos[r, h:h + nh] = s.hidden_pos
                batch.hidden_sample[r, h:h + nh] = sample
                batch.is_target[r, h:h + nh] = s.is_target
                c, h, sample = c + nc, h + nh, sample + 1
        return batch

    @classmethod
    def padded(cls, splits: list):
        """An ordinary batch: one image per row, padded to the longest streams."""
        return cls.from_rows([[s] for s in splits], max(len(s.context_pos) for s in splits),
                             max(len(s.hidden_pos) for s in splits))

    def whole_images(self):
        """Both streams side by side, what the teacher sees: patches (B, Lc + Lh, C*p*p), pos, sample."""
        return (torch.cat([self.context_patches, self.hidden_patches], 1),
                torch.cat([self.context_pos, self.hidden_pos], 1),
                torch.cat([self.context_sample, self.hidden_sample], 1))

    def to(self, device):
        return MaskedBatch(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(self).items()})


def mask_images(images: torch.Tensor, patch_size: int, masking, g: torch.Generator, labels=None) -> MaskedBatch:
    """A batch of same-size images (B, C, H, W) -> an ordinary MaskedBatch (one image per row)."""
    labels = [-1] * len(images) if labels is None else labels
    return MaskedBatch.padded([split_image(x, patch_size, masking, g, int(y)) for x, y in zip(images, labels)])


# -----------------------------------------------------------------------------------------------
# 9. I-JEPA


@dataclass
class JEPAOutput:
    """What a forward returns, laid out like the hidden stream (B, Lh); the properties list the T
    predicted tokens alone. Lh is the longest hidden stream of the batch: for an ordinary batch it
    changes with the masks from batch to batch (a compiled model sees a new shape), for a packed
    batch (packing.py) it is fixed, so every packed batch has one shape."""

    loss: torch.Tensor  # scalar: mean over every predicted token and channel
    loss_per_slot: torch.Tensor  # (B, Lh) mean loss of each hidden-stream slot (0 where not a target)
    is_target: torch.Tensor  # (B, Lh) bool: the slots that count
    sample: torch.Tensor  # (B, Lh) image id of each slot
    pos: torch.Tensor  # (B, Lh, 2) (row, col) of each slot
    prediction: torch.Tensor  # (B, Lh, D) the predictor's output
    teacher_features: torch.Tensor  # (B, Lh, D) the teacher's features after the feature norm: the targets where is_target
    parts: dict = field(default_factory=dict)  # name -> detached scalar: the loss's parts, where it has several (logged)

    @property
    def token_loss(self):  # (T,) loss of each predicted token
        return self.loss_per_slot[self.is_target]

    @property
    def token_sample(self):  # (T,) its image id in the batch
        return self.sample[self.is_target]

    @property
    def token_pos(self):  # (T, 2) its (row, col): scatter into a grid to draw a loss map
        return self.pos[self.is_target]


class IJEPA(nn.Module):
    """Student (context encoder), EMA teacher (target encoder, no gradients) and predictor.

    `forward` runs the four stages of the method; each is a method, so that a variant
    (studies/ec_ijepa.py) can replace one stage and keep the others."""

    encoder_class = VisionTransformer

    def __init__(self, cfg: JEPAConfig = JEPAConfig()):
        super().__init__()
        self.cfg = cfg
        self.student = self.encoder_class(cfg.encoder_config())
        self.predictor = self.make_predictor()
        self.teacher = self.encoder_class(cfg.encoder_config())
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

    def make_predictor(self) -> nn.Module:
        """The predictor, built after the student (a variant that predicts something else replaces it)."""
        return Predictor(self.cfg.predictor_config(), self.student.cfg.dim, self.cfg.predictor_norm)

    def forward(self, batch: MaskedBatch) -> JEPAOutput:
        teacher_features = self.encode_targets(batch)  # 1. (B, Lh, D)
        context = self.encode_context(batch)  # 2. (B, Lc, D)
        prediction = self.predict(context, batch)  # 3. (B, Lh, D)
        return self.loss(prediction, teacher_features, batch)  # 4.

    @torch.no_grad()
    def encode_targets(self, batch: MaskedBatch) -> torch.Tensor:
        """1. Target encoding: the teacher sees the whole image (both streams); its features at the
        hidden stream, after the feature norm, are the targets where `is_target`. No gradient."""
        whole = self.teacher(*batch.whole_images())  # (B, Lc + Lh, D)
        return self.teacher_targets(whole, batch)

    def teacher_targets(self, whole: torch.Tensor, batch: MaskedBatch) -> torch.Tensor:
        """The teacher's output over both streams (B, Lc + Lh, D) -> the feature-normed hidden stream (B, Lh, D)."""
        return apply_feature_norm(whole[:, batch.context_patches.shape[1]:], batch.is_target, self.cfg.feature_norm)

    def encode_context(self, batch: MaskedBatch) -> torch.Tensor:
        """2. Context encoding: the student sees only the context stream."""
        return self.student(batch.context_patches, batch.context_pos, batch.context_sample)  # (B, Lc, D)

    def predict(self, context: torch.Tensor, batch: MaskedBatch) -> torch.Tensor:
        """3. Prediction at every target position of the hidden stream (other slots act as padding)."""
        query_sample = torch.where(batch.is_target, batch.hidden_sample, -1)
        return self.predictor(context, batch.context_pos, batch.context_sample, batch.hidden_pos, query_sample)

    def loss(self, prediction: torch.Tensor, teacher_features: torch.Tensor, batch: MaskedBatch) -> JEPAOutput:
        """4. The loss, a mean over the predicted tokens and their channels (smooth-L1, beta 1, or MSE)."""
        # The slots that are not targets are selected out (set to 0 in both), not multiplied by 0
        # afterwards: whatever they hold, inf or NaN included, never reaches the loss or its
        # gradient (0 x inf is NaN).
        keep = batch.is_target[..., None]  # (B, Lh, 1)
        prediction_kept = torch.where(keep, prediction.float(), 0.0)
        targets_kept = torch.where(keep, teacher_features.float(), 0.0)
        if self.cfg.loss == "smooth_l1":
            per_elem = F.smooth_l1_loss(prediction_kept, targets_kept, reduction="none", beta=1.0)
        else:
            per_elem = F.mse_loss(prediction_kept, targets_kept, reduction="none")
        per_slot = per_elem.mean(-1)  # (B, Lh), 0 where not a target
        loss = per_slot.sum() / batch.is_target.sum().clamp(min=1)
        return JEPAOutput(loss, per_slot, batch.is_target, batch.hidden_sample, batch.hidden_pos, prediction,
                          teacher_features)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter (the
        DynTanh alpha included)."""
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.lerp_(s.detach(), 1.0 - momentum)
