"""I-JEPA from scratch: the vision transformer, masking, predictor and training objective.

Read top to bottom:
  1. configuration            5. feature normalisation of the teacher's output
  2. patches and positions    6. the predictor
  3. attention by sample id   7. masking (multi-block, window)
  4. the ViT encoder          8. the masked batch (one image per row, or packed)
  9. I-JEPA: student, EMA teacher, predictor, loss
 10. schedules and optimiser parameter groups
 11. loading a released official checkpoint

One convention runs through the whole file: every token carries the id of the image it belongs
to (`sample`, -1 for padding) and its patch coordinates (`pos` = (row, col)). Attention is only
allowed between tokens with the same sample id, so an ordinary batch (one image per row) and a
packed batch (several images per row, see packing.py) go through the same forward.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------
# 1. Configuration

# name -> (width, depth, heads, predictor width, predictor depth)
PRESETS = {
    "micro": (128, 4, 4, 64, 3),  # CPU-sized: quick modes and tests
    "tiny": (192, 12, 3, 384, 6),
    "small": (384, 12, 6, 384, 6),
    "base": (768, 12, 12, 384, 6),
}
FEATURE_NORMS = ("layernorm", "dyntanh", "batchnorm", "none")
LOSSES = ("smooth_l1", "mse")


@dataclass(frozen=True)
class ViTConfig:
    dim: int = 192
    depth: int = 12
    heads: int = 3
    patch_size: int = 16
    in_chans: int = 3
    mlp_ratio: float = 4.0
    final_norm: str = "layernorm"  # "layernorm" (affine, as released), "dyntanh", or "none" (raw block output)

    def __post_init__(self):
        if self.dim % self.heads or self.dim % 4:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads} and by 4")
        if self.final_norm not in ("layernorm", "dyntanh", "none"):
            raise ValueError(f"final_norm must be 'layernorm', 'dyntanh' or 'none', got {self.final_norm!r}")


@dataclass(frozen=True)
class JEPAConfig:
    model: str = "micro"
    patch_size: int = 8
    in_chans: int = 3
    predictor_dim: int | None = None  # None: the preset's
    predictor_depth: int | None = None
    feature_norm: str = "layernorm"
    loss: str = "smooth_l1"
    condition_encoders: bool = False  # EC-IJEPA: append pooled position tokens to the encoders

    def __post_init__(self):
        if self.model not in PRESETS:
            raise ValueError(f"unknown preset {self.model!r}; choose one of {sorted(PRESETS)}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"unknown feature norm {self.feature_norm!r}; choose one of {FEATURE_NORMS}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        heads = PRESETS[self.model][2]  # the predictor shares the encoder's head count
        step = math.lcm(heads, 4)  # whole heads, and sin-cos positions in four equal parts
        if self.predictor_dim is not None and (self.predictor_dim < 1 or self.predictor_dim % step):
            raise ValueError(f"predictor_dim={self.predictor_dim}: must be a positive multiple of {step} "
                             f"for {self.model!r} ({heads} heads; sin-cos positions need a multiple of 4)")
        if self.predictor_depth is not None and self.predictor_depth < 1:
            raise ValueError(f"predictor_depth={self.predictor_depth}: must be at least 1")

    def encoder_config(self) -> ViTConfig:
        dim, depth, heads, _, _ = PRESETS[self.model]
        # The encoder's last layer is part of the feature norm: the released encoders end in an
        # affine LayerNorm (then the targets get a parameter-free one on top); DynTanh replaces it;
        # "batchnorm" and "none" start from the raw output of the last block.
        final = {"layernorm": "layernorm", "dyntanh": "dyntanh"}.get(self.feature_norm, "none")
        return ViTConfig(dim, depth, heads, self.patch_size, self.in_chans, final_norm=final)

    def predictor_config(self) -> ViTConfig:
        _, _, heads, pdim, pdepth = PRESETS[self.model]
        return ViTConfig(pdim if self.predictor_dim is None else self.predictor_dim,
                         pdepth if self.predictor_depth is None else self.predictor_depth, heads,
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
# 3. Attention, restricted to tokens of the same image


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
    larger. This is the official ViT constructor's scheme with bounds that truncate. (The official
    training then re-initialises every Linear with bounds of +-2 in absolute value, which truncate
    nothing, and so discards the per-layer rescale: there, every Linear starts at std 0.02.)"""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for layer, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))


# -----------------------------------------------------------------------------------------------
# 4. The encoder


class DynTanh(nn.Module):
    """y = tanh(alpha * x), alpha a learnable per-channel vector (no affine). Unlike LayerNorm it
    bounds the features without giving every token the same norm."""

    def __init__(self, dim: int, init_alpha: float = 0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((dim,), init_alpha))

    def forward(self, x):
        return torch.tanh(self.alpha * x)


class VisionTransformer(nn.Module):
    """ViT without cls token or head: patch tokens in, patch tokens out.

    `forward` takes flat token sets so that padded and packed batches are the same case:
        patches (B, L, C*p*p), pos (B, L, 2) integer (row, col), sample (B, L) image id, -1 = pad.
    Optional conditioning tokens (EC-IJEPA) are position-only tokens appended to the sequence:
        cond (B, S, D), cond_sample (B, S); they take part in attention and are dropped at the output.
    Returns the final tokens (B, L, D) after the final norm, and with `return_layers=True` also
    a list with every block's output tokens (B, L, D), before the final norm, for probing.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.in_chans * cfg.patch_size ** 2, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = {"layernorm": lambda: nn.LayerNorm(cfg.dim, eps=1e-6), "dyntanh": lambda: DynTanh(cfg.dim),
                     "none": nn.Identity}[cfg.final_norm]()
        init_weights(self, self.blocks)

    def forward(self, patches, pos, sample, cond=None, cond_sample=None, return_layers=False):
        L = patches.shape[1]
        x = self.patch_embed(patches) + sincos_2d(pos, self.cfg.dim)  # (B, L, D)
        if cond is not None:
            x = torch.cat([x, cond], dim=1)  # (B, L + S, D)
            sample = torch.cat([sample, cond_sample], dim=1)
        mask = attention_mask(sample)
        layers = []
        for block in self.blocks:
            x = block(x, mask)
            layers.append(x[:, :L])
        out = self.norm(x[:, :L])
        return (out, layers) if return_layers else out

    def encode(self, images, return_layers=False, condition=False):
        """Plain images (B, C, H, W) -> tokens (B, N, D) in raster order (and per-block tokens).

        With `condition=True` (for encoders pre-trained with encoder conditioning) every image is
        given its position embeddings average-pooled over 4x4 patch windows as extra tokens.
        """
        check_images(images, self.cfg.patch_size, self.cfg.in_chans)
        B, _, H, W = images.shape
        h, w = H // self.cfg.patch_size, W // self.cfg.patch_size
        pos = grid_coords(h, w, images.device).expand(B, -1, -1)  # (B, N, 2)
        sample = torch.arange(B, device=images.device)[:, None].expand(-1, h * w)  # (B, N)
        cond = cond_sample = None
        if condition:
            table = sincos_2d(pos[0], self.cfg.dim).T.reshape(1, self.cfg.dim, h, w)
            pooled = F.avg_pool2d(table, kernel_size=4, stride=4, ceil_mode=True)  # (1, D, h/4, w/4)
            cond = pooled.flatten(2).transpose(1, 2).expand(B, -1, -1)  # (B, S, D)
            cond_sample = sample[:, :1].expand(-1, cond.shape[1])
        return self(patchify(images, self.cfg.patch_size), pos, sample, cond, cond_sample,
                     return_layers=return_layers)


# -----------------------------------------------------------------------------------------------
# 5. Feature normalisation of the teacher's output (the regression targets)


def normalize_targets(feats: torch.Tensor, valid: torch.Tensor, mode: str) -> torch.Tensor:
    """Targets from teacher tokens (B, L, D); `valid` (B, L) marks the tokens that are predicted.

    What reaches this function depends on the mode too (`JEPAConfig.encoder_config`):
    layernorm: the encoder ends in an affine LayerNorm, then a parameter-free LayerNorm over
               channels (the original I-JEPA): every token gets the same norm.
    dyntanh:   the encoder ends in DynTanh, which bounds the features without equalising their
               norms; nothing more here.
    batchnorm: the encoder ends without a norm; per-channel standardisation with statistics over
               the valid target tokens only (padding never enters).
    none:      the encoder ends without a norm; its raw output is the target.
    """
    if mode == "layernorm":
        return F.layer_norm(feats, feats.shape[-1:])
    if mode == "batchnorm":  # masked statistics: no data-dependent shapes, so it compiles
        w = valid[..., None].to(feats.dtype)  # (B, L, 1)
        n = w.sum().clamp(min=1)
        mean = (feats * w).sum((0, 1)) / n  # (D,)
        var = ((feats - mean) ** 2 * w).sum((0, 1)) / n
        return (feats - mean) / torch.sqrt(var + 1e-6)
    return feats  # "dyntanh" and "none"


# -----------------------------------------------------------------------------------------------
# 6. The predictor


class Predictor(nn.Module):
    """Narrow ViT that predicts the teacher's features at target positions from the context.

    context (B, Lc, D) with context_pos/context_sample; target_pos (B, Lt, 2), target_sample
    (B, Lt) (-1 where nothing is to be predicted). Each target slot starts as the shared learned
    mask token plus the sin-cos embedding of its position; all targets of an image are predicted
    in one pass, attending to that image's context and its other mask tokens.
    Returns predictions (B, Lt, D), at the target slots only.
    """

    def __init__(self, cfg: ViTConfig, encoder_dim: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(encoder_dim, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.proj = nn.Linear(cfg.dim, encoder_dim)
        init_weights(self, self.blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.04, b=0.04)

    def forward(self, context, context_pos, context_sample, target_pos, target_sample):
        Lc = context.shape[1]
        ctx = self.embed(context) + sincos_2d(context_pos, self.cfg.dim)  # (B, Lc, Dp)
        tgt = self.mask_token + sincos_2d(target_pos, self.cfg.dim)  # (B, Lt, Dp)
        x = torch.cat([ctx, tgt], dim=1)  # (B, Lc + Lt, Dp)
        mask = attention_mask(torch.cat([context_sample, target_sample], dim=1))
        for block in self.blocks:
            x = block(x, mask)
        return self.proj(self.norm(x[:, Lc:]))  # (B, Lt, D)


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


def _uniform(lo: float, hi: float, g: torch.Generator) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _randint(hi_inclusive: int, g: torch.Generator) -> int:
    return int(torch.randint(hi_inclusive + 1, (), generator=g))


@dataclass
class MultiBlockMasking:
    """I-JEPA multi-block masking: 4 target blocks and 1 large context block minus the targets.

    The context block has the grid's own aspect ratio (on the official square grids: aspect 1),
    so that it covers 85-100% of any grid; a square block on a 4x8 grid could cover only 62%.

    Unlike the official sampler: a block's corner is drawn over every valid position, so every
    patch can be a target and context (the official one never covers the last row and column);
    scale and aspect ratio are drawn independently; masks are per image, never truncated to the
    batch's shortest; and sampling always terminates: after `attempts` draws whose context keeps
    fewer than `min_context` patches, the draw with the largest context is taken and its target
    blocks are dropped, last first, until the context is large enough (one target block of at
    most 20% inside a context of at least 85% always leaves enough).
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
                    target=target.flatten().nonzero().squeeze(1))


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
# 8. The masked batch
#
# Each image is cut into two token streams: the *context* stream (the patches the student sees)
# and the *target* stream (every other patch; `predict` marks the targets). Together the two
# streams hold the whole image once, which is what the teacher sees. A batch has `rows`; a row
# holds one image (ordinary batch) or several (packed): sample ids keep them apart.

COND_TOKENS = 8  # pooled position tokens per image and stream, for encoder conditioning


@dataclass
class SplitImage:
    """One image cut into its two streams (the unit that batches are built from)."""

    context_patches: torch.Tensor  # (Nc, C*p*p)
    context_pos: torch.Tensor  # (Nc, 2)
    target_patches: torch.Tensor  # (Nt, C*p*p) every patch that is not context
    target_pos: torch.Tensor  # (Nt, 2)
    predict: torch.Tensor  # (Nt,) bool: a target of the masking
    grid: tuple  # (h, w) patches
    label: int = -1


def split_image(image: torch.Tensor, patch_size: int, masking, g: torch.Generator, label=-1) -> SplitImage:
    """(C, H, W) image -> SplitImage, with the mask drawn from `masking` and generator `g`."""
    check_images(image[None], patch_size, image.shape[0])
    h, w = image.shape[1] // patch_size, image.shape[2] // patch_size
    mask = masking(h, w, g)
    patches, pos = patchify(image[None], patch_size)[0], grid_coords(h, w)  # (N, P), (N, 2)
    is_ctx = torch.zeros(h * w, dtype=torch.bool)
    is_ctx[mask.context] = True
    rest = (~is_ctx).nonzero().squeeze(1)
    predict = torch.zeros(h * w, dtype=torch.bool)
    predict[mask.target] = True
    return SplitImage(patches[mask.context], pos[mask.context], patches[rest], pos[rest],
                      predict[rest], (h, w), int(label))


def _pool_slots(n: int, first_slot: int) -> torch.Tensor:
    """Slot ids for 1-D average pooling of n tokens into at most COND_TOKENS equal runs."""
    k = max(1, math.ceil(n / COND_TOKENS))  # kernel = stride
    return first_slot + torch.arange(n) // k


@dataclass
class MaskedBatch:
    """The model's input: rows of context and target streams, padded to fixed lengths.

    Sample ids number the images of the batch 0..n_images-1 (-1 = padding); `pos` is each token's
    (row, col) in its own image. `*_pool` give the encoder-conditioning slot of each token
    (-1 = none); `n_pool_slots` is the slot count per row.
    """

    context_patches: torch.Tensor  # (B, Lc, C*p*p)
    context_pos: torch.Tensor  # (B, Lc, 2)
    context_sample: torch.Tensor  # (B, Lc)
    target_patches: torch.Tensor  # (B, Lt, C*p*p)
    target_pos: torch.Tensor  # (B, Lt, 2)
    target_sample: torch.Tensor  # (B, Lt)
    predict: torch.Tensor  # (B, Lt) bool, False on padding
    context_pool: torch.Tensor  # (B, Lc) conditioning slot of each context token
    target_pool: torch.Tensor  # (B, Lt) conditioning slot of each predicted target token
    n_pool_slots: int
    grids: torch.Tensor  # (n_images, 2) patch grid of each image
    labels: torch.Tensor  # (n_images,) -1 where unknown

    @classmethod
    def from_rows(cls, rows: list, context_len: int, target_len: int, pool_images_per_row=None):
        """Lay out rows of SplitImages (a list per row) into fixed (rows, context_len) and
        (rows, target_len) streams; padding carries sample id -1 and zero pixels."""
        first = next(s for row in rows for s in row)
        B, P = len(rows), first.context_patches.shape[1]
        per_row = pool_images_per_row or max(len(row) for row in rows)
        batch = cls(
            context_patches=torch.zeros(B, context_len, P), context_pos=torch.zeros(B, context_len, 2, dtype=torch.long),
            context_sample=torch.full((B, context_len), -1), target_patches=torch.zeros(B, target_len, P),
            target_pos=torch.zeros(B, target_len, 2, dtype=torch.long), target_sample=torch.full((B, target_len), -1),
            predict=torch.zeros(B, target_len, dtype=torch.bool), context_pool=torch.full((B, context_len), -1),
            target_pool=torch.full((B, target_len), -1), n_pool_slots=COND_TOKENS * per_row,
            grids=torch.tensor([s.grid for row in rows for s in row]).reshape(-1, 2),
            labels=torch.tensor([s.label for row in rows for s in row], dtype=torch.long))
        sample = 0
        for r, row in enumerate(rows):
            if sum(len(s.context_pos) for s in row) > context_len or sum(len(s.target_pos) for s in row) > target_len:
                raise ValueError(f"row {r} holds more tokens than the stream lengths {context_len}/{target_len}")
            c = t = 0
            for i, s in enumerate(row):
                nc, nt = len(s.context_pos), len(s.target_pos)
                batch.context_patches[r, c:c + nc] = s.context_patches
                batch.context_pos[r, c:c + nc] = s.context_pos
                batch.context_sample[r, c:c + nc] = sample
                batch.context_pool[r, c:c + nc] = _pool_slots(nc, COND_TOKENS * i)
                batch.target_patches[r, t:t + nt] = s.target_patches
                batch.target_pos[r, t:t + nt] = s.target_pos
                batch.target_sample[r, t:t + nt] = sample
                batch.predict[r, t:t + nt] = s.predict
                pool = torch.full((nt,), -1)
                pool[s.predict] = _pool_slots(int(s.predict.sum()), COND_TOKENS * i)
                batch.target_pool[r, t:t + nt] = pool
                c, t, sample = c + nc, t + nt, sample + 1
        return batch

    @classmethod
    def padded(cls, splits: list):
        """An ordinary batch: one image per row, padded to the longest streams."""
        return cls.from_rows([[s] for s in splits], max(len(s.context_pos) for s in splits),
                             max(len(s.target_pos) for s in splits))

    def to(self, device):
        return MaskedBatch(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(self).items()})


def mask_images(images: torch.Tensor, patch_size: int, masking, g: torch.Generator, labels=None) -> MaskedBatch:
    """A batch of same-size images (B, C, H, W) -> an ordinary MaskedBatch (one image per row)."""
    labels = [-1] * len(images) if labels is None else labels
    return MaskedBatch.padded([split_image(x, patch_size, masking, g, int(y)) for x, y in zip(images, labels)])


# -----------------------------------------------------------------------------------------------
# 9. I-JEPA


def pooled_position_tokens(pos_emb, slot, sample, n_slots):
    """Average position embeddings by slot: (B, L, D), (B, L), (B, L) -> (B, S, D), (B, S).

    Empty slots come back with sample id -1, so they behave as padding."""
    B, L, D = pos_emb.shape
    used = slot >= 0
    idx = slot.clamp(min=0)
    sums = pos_emb.new_zeros(B, n_slots, D).scatter_add_(1, idx[..., None].expand(-1, -1, D),
                                                         pos_emb * used[..., None])
    counts = pos_emb.new_zeros(B, n_slots).scatter_add_(1, idx, used.to(pos_emb.dtype))
    ids = torch.full((B, n_slots), -1, device=slot.device).scatter_reduce_(
        1, idx, torch.where(used, sample, -1), reduce="amax")
    return sums / counts.clamp(min=1)[..., None], ids


@dataclass
class JEPAOutput:
    """What a forward returns. Everything is laid out like the target stream (B, Lt), so shapes
    never depend on the masks (a compiled model never recompiles); the properties list the T
    predicted tokens alone."""

    loss: torch.Tensor  # scalar: mean over every predicted token and channel
    loss_per_slot: torch.Tensor  # (B, Lt) mean loss of each target-stream slot (0 where not predicted)
    predict: torch.Tensor  # (B, Lt) bool: the slots that count
    sample: torch.Tensor  # (B, Lt) image id of each slot
    pos: torch.Tensor  # (B, Lt, 2) (row, col) of each slot
    prediction: torch.Tensor  # (B, Lt, D) the predictor's output
    target: torch.Tensor  # (B, Lt, D) the normalised teacher features

    @property
    def token_loss(self):  # (T,) loss of each predicted token
        return self.loss_per_slot[self.predict]

    @property
    def token_sample(self):  # (T,) its image id in the batch
        return self.sample[self.predict]

    @property
    def token_pos(self):  # (T, 2) its (row, col): scatter into a grid to draw a loss map
        return self.pos[self.predict]


class IJEPA(nn.Module):
    """Student (context encoder), EMA teacher (target encoder, no gradients) and predictor."""

    def __init__(self, cfg: JEPAConfig = JEPAConfig()):
        super().__init__()
        self.cfg = cfg
        self.student = VisionTransformer(cfg.encoder_config())
        self.predictor = Predictor(cfg.predictor_config(), self.student.cfg.dim)
        self.teacher = VisionTransformer(cfg.encoder_config())
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

    def forward(self, batch: MaskedBatch) -> JEPAOutput:
        Lc, D = batch.context_patches.shape[1], self.student.cfg.dim
        student_cond = teacher_cond = (None, None)
        if self.cfg.condition_encoders:  # EC-IJEPA: each encoder learns where the other's tokens are
            student_cond = pooled_position_tokens(sincos_2d(batch.target_pos, D), batch.target_pool,
                                                  batch.target_sample, batch.n_pool_slots)
            teacher_cond = pooled_position_tokens(sincos_2d(batch.context_pos, D), batch.context_pool,
                                                  batch.context_sample, batch.n_pool_slots)

        # 1. target encoding: the teacher sees the whole image (both streams), then feature norm
        with torch.no_grad():
            full = self.teacher(torch.cat([batch.context_patches, batch.target_patches], 1),
                                torch.cat([batch.context_pos, batch.target_pos], 1),
                                torch.cat([batch.context_sample, batch.target_sample], 1),
                                *teacher_cond)  # (B, Lc + Lt, D)
            targets = normalize_targets(full[:, Lc:], batch.predict, self.cfg.feature_norm)  # (B, Lt, D)

        # 2. context encoding: the student sees only the context stream
        context = self.student(batch.context_patches, batch.context_pos, batch.context_sample,
                               *student_cond)  # (B, Lc, D)

        # 3. prediction at every target position
        predict_sample = torch.where(batch.predict, batch.target_sample, -1)
        pred = self.predictor(context, batch.context_pos, batch.context_sample,
                              batch.target_pos, predict_sample)  # (B, Lt, D)

        # 4. loss over the predicted tokens only
        if self.cfg.loss == "smooth_l1":
            per_elem = F.smooth_l1_loss(pred.float(), targets.float(), reduction="none", beta=1.0)
        else:
            per_elem = F.mse_loss(pred.float(), targets.float(), reduction="none")
        weight = batch.predict.to(per_elem.dtype)  # (B, Lt)
        per_slot = per_elem.mean(-1) * weight  # (B, Lt)
        loss = per_slot.sum() / weight.sum().clamp(min=1)
        return JEPAOutput(loss, per_slot, batch.predict, batch.target_sample, batch.target_pos, pred, targets)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter (the
        DynTanh alpha included)."""
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.lerp_(s.detach(), 1.0 - momentum)


# -----------------------------------------------------------------------------------------------
# 10. Schedules (pure functions of the step) and optimiser parameter groups


def lr_at(step: int, total: int, peak: float, warmup: int, final: float = 1e-6) -> float:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to `final`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))


def weight_decay_at(step: int, total: int, start: float = 0.04, end: float = 0.4) -> float:
    """Cosine from `start` to `end` over the run (the official schedule grows it)."""
    progress = min(1.0, step / max(1, total))
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def ema_momentum_at(step: int, total: int, start: float = 0.996, end: float = 1.0) -> float:
    """Linear from `start` to `end` over the run."""
    return start + (end - start) * min(1.0, step / max(1, total))


def param_groups(model: IJEPA) -> list:
    """AdamW groups over the trainable parts (student and predictor): weight decay on matrices
    only; none on 1-D tensors (biases, norms, DynTanh alpha) or the mask token (the official code
    decays the mask token, a (1, 1, D) tensor, like a matrix). The fixed sin-cos positions are not
    parameters at all. Groups carry `apply_wd` so the schedule can set them."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("mask_token") else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


# -----------------------------------------------------------------------------------------------
# 11. Loading a released official checkpoint
#
# Official layout: {"encoder", "predictor", "target_encoder", "opt", ...}, each a state dict whose
# keys start with "module." (DDP). Encoder keys equal ours but for the patch embedding (a Conv2d)
# and a fixed `pos_embed` table (ours is computed); predictor keys carry a "predictor_" prefix.


def _official_encoder_to_ours(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k == "pos_embed":
            continue  # fixed sin-cos table: computed from coordinates here
        if k == "patch_embed.proj.weight":
            k, v = "patch_embed.weight", v.flatten(1)  # (D, C, p, p) -> (D, C*p*p)
        elif k == "patch_embed.proj.bias":
            k = "patch_embed.bias"
        out[k] = v
    return out


def _official_predictor_to_ours(sd: dict) -> dict:
    return {k.removeprefix("predictor_"): v for k, v in sd.items() if k != "predictor_pos_embed"}


def _load_strict(module: nn.Module, sd: dict, what: str) -> None:
    ours = module.state_dict()
    missing = sorted(set(ours) - set(sd))
    unexpected = sorted(set(sd) - set(ours))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(ours[k].shape)}"
             for k in sorted(set(sd) & set(ours)) if sd[k].shape != ours[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"the checkpoint's {what} does not fit this model: missing keys {missing}, "
                         f"unexpected keys {unexpected}, wrong shapes {wrong}. Build the model with the "
                         f"checkpoint's preset and patch size.")
    module.load_state_dict(sd)


def load_official_checkpoint(source, encoder: VisionTransformer, predictor: Predictor | None = None) -> list:
    """Load a released official I-JEPA checkpoint (a path or its loaded dict) into `encoder`
    (from `target_encoder`, the EMA teacher that is kept after pre-training) and, when given and
    present, into `predictor`. Returns the names of what was loaded."""
    if isinstance(source, dict):
        ckpt = source
    else:
        try:
            ckpt = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or not a torch file
            raise ValueError(f"cannot read checkpoint file {source!r} ({type(e).__name__}: {e}); "
                             f"it is truncated or not a PyTorch checkpoint: download it again") from e
    if not isinstance(ckpt, dict) or "target_encoder" not in ckpt:
        keys = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"unknown checkpoint layout: expected the official top-level keys "
                         f"'encoder', 'predictor', 'target_encoder'; found {keys}")

    def strip(sd):
        return {k.removeprefix("module."): v for k, v in sd.items()}

    _load_strict(encoder, _official_encoder_to_ours(strip(ckpt["target_encoder"])), "target_encoder")
    loaded = ["target_encoder"]
    if predictor is not None and "predictor" in ckpt:
        _load_strict(predictor, _official_predictor_to_ours(strip(ckpt["predictor"])), "predictor")
        loaded.append("predictor")
    return loaded
