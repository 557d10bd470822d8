"""Attention maps: which tokens each token of a frozen encoder attends to, block by block.

`models.Attention` calls `F.scaled_dot_product_attention`, which never materialises its weights.
`attention_weights` recomputes them from what each block's attention receives (its normed input
and the attention mask), with the block's own query and key projections: the same softmax,
written out, so the model itself needs no switch for it.
"""

import torch

import models as M


@torch.no_grad()
def attention_weights(encoder: M.VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Plain images (B, C, H, W) -> every block's attention weights (depth, B, heads, L, L):
    [l, b, k, i, j] is how much query token i of image b puts on key token j in head k of block
    l. Each row sums to 1. The first N = h*w tokens are the patches in raster order; L > N only
    for an encoder that appends tokens of its own (EC-IJEPA's conditioning tokens, after the
    patches). The encoder is run as evaluation runs it (`encode`), so a subclass that encodes
    differently is drawn as it encodes."""
    inputs = []

    def keep(module, args):  # a forward pre-hook: args = (normed tokens (B, L, D), mask (B, 1, L, L))
        inputs.append((module, *args))

    hooks = [block.attn.register_forward_pre_hook(keep) for block in encoder.blocks]
    try:
        encoder.encode(images)
    finally:
        for hook in hooks:
            hook.remove()
    weights = []
    for attn, x, mask in inputs:
        B, L, D = x.shape
        qkv = attn.qkv(x).reshape(B, L, 3, attn.heads, D // attn.heads)  # (B, L, 3, H, D/H)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, D/H)
        scores = q @ k.transpose(-2, -1) / (D // attn.heads) ** 0.5  # (B, H, L, L)
        weights.append(scores.masked_fill(~mask, float("-inf")).softmax(-1))
    return torch.stack(weights)  # (depth, B, H, L, L)


def attention_distance(weights: torch.Tensor, grid: tuple) -> torch.Tensor:
    """Attention weights (..., N, N) over an h x w patch grid -> (..., N): each query's mean
    distance, in patches, to the keys it attends to, weighted by its attention (the 'attention
    distance' of ViT analyses: small = local, about a third of the grid = spread over the image)."""
    pos = M.grid_coords(*grid, weights.device).to(weights.dtype)  # (N, 2) (row, col)
    distance = torch.cdist(pos, pos)  # (N, N) Euclidean, in patches
    return (weights * distance).sum(-1)
