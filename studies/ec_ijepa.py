"""Encoder-conditioned I-JEPA (EC-IJEPA): each encoder is told where the other stream's tokens are.

The student, which sees only the context, also gets tokens that carry the *target* positions; the
teacher, which sees the whole image, gets tokens that carry the *context* positions. A
conditioning token is the mean of the sin-cos position embeddings of a run of consecutive tokens
(1-D average pooling in stream order, which is raster order, into at most POOLED_TOKENS runs per
image). It takes part in attention with its image's sample id and is dropped at the output.
At inference an encoder gets every position of the image, pooled the same way, so training and
evaluation condition alike, and `evaluate.layer_features` (which calls `encode`) probes a
conditioned encoder as it was trained.

    model = ConditionedIJEPA(M.JEPAConfig())   # a drop-in IJEPA: train.py builds it for --condition-encoders
    model.teacher.encode(images)               # conditioned on all of each image's positions

models.py does not know this file: the variant replaces the encoder class and two of the four
stages of `IJEPA.forward`.
"""

import torch

import models as M

POOLED_TOKENS = 8  # conditioning tokens per image and stream


def pooling_slots(valid, sample, images_per_row: int):
    """Which conditioning token each `valid` token is pooled into.

    valid (B, L) bool, sample (B, L) image ids (each image's tokens contiguous in its row, as
    MaskedBatch lays them out) -> slot (B, L) in [0, POOLED_TOKENS * images_per_row): image k of a
    row owns slots k*POOLED_TOKENS onwards; its n valid tokens, in stream order, are cut into runs
    of ceil(n / POOLED_TOKENS), one slot a run. The slot of a token that is not valid is 0 and means
    nothing."""
    B, L = sample.shape
    R, P = images_per_row, POOLED_TOKENS
    real = sample >= 0
    first = torch.where(real, sample, torch.iinfo(sample.dtype).max).amin(1, keepdim=True)  # (B, 1) first image of the row
    ordinal = torch.where(real, sample - first, 0)  # (B, L) the image's place in its row
    before = valid.long().cumsum(1) - valid.long()  # (B, L) valid tokens before this one in the row
    start = torch.full((B, R), L, dtype=torch.long, device=sample.device).scatter_reduce(
        1, ordinal, torch.where(valid, before, L), reduce="amin")  # (B, R) valid tokens before each image
    count = torch.zeros(B, R, dtype=torch.long, device=sample.device).scatter_add(1, ordinal, valid.long())  # (B, R)
    run = ((count + P - 1) // P).clamp(min=1).gather(1, ordinal)  # (B, L) run length of the token's image
    return torch.where(valid, ordinal * P + (before - start.gather(1, ordinal)) // run, 0)  # (B, L)


def position_tokens(pos, valid, sample, images_per_row: int, dim: int):
    """Pooled position tokens of the `valid` tokens of each image.

    pos (B, L, 2), valid (B, L) bool, sample (B, L) image ids -> tokens (B, S, dim) and their sample
    ids (B, S), with S = POOLED_TOKENS * images_per_row: a fixed shape, so a compiled model does not
    recompile. Each token is the mean sin-cos embedding of one run of `pooling_slots`. Unused slots
    get sample id -1 and act as padding.
    """
    B, S = sample.shape[0], POOLED_TOKENS * images_per_row
    slot = pooling_slots(valid, sample, images_per_row)  # (B, L)
    emb = M.sincos_2d(pos, dim) * valid[..., None]  # (B, L, D), zero where not pooled
    sums = emb.new_zeros(B, S, dim).scatter_add_(1, slot[..., None].expand(-1, -1, dim), emb)
    counts = emb.new_zeros(B, S).scatter_add_(1, slot, valid.to(emb.dtype))
    ids = torch.full((B, S), -1, device=sample.device).scatter_reduce_(
        1, slot, torch.where(valid, sample, -1), reduce="amax")  # (B, S), -1 = unused
    return sums / counts.clamp(min=1)[..., None], ids


class ConditionedViT(M.VisionTransformer):
    """A ViT that also takes conditioning tokens (B, S, D) with sample ids (B, S): they join the
    attention and are dropped at the output."""

    def forward(self, patches, pos, sample, cond=None, cond_sample=None, return_layers=False):
        if cond is None:
            return super().forward(patches, pos, sample, return_layers)
        L = patches.shape[1]
        x = torch.cat([self.embed(patches, pos), cond], dim=1)  # (B, L + S, D)
        result = self.transform(x, torch.cat([sample, cond_sample], dim=1), return_layers)
        if return_layers:
            out, layers = result
            return out[:, :L], [t[:, :L] for t in layers]
        return result[:, :L]

    def encode(self, images, return_layers=False):
        """Plain images, each conditioned on all of its positions (pooled as in training)."""
        patches, pos, sample = self.image_tokens(images)
        cond = position_tokens(pos, torch.ones_like(sample, dtype=torch.bool), sample, 1, self.cfg.dim)
        return self(patches, pos, sample, *cond, return_layers=return_layers)


class ConditionedIJEPA(M.IJEPA):
    """I-JEPA whose student is conditioned on the target positions and whose teacher is conditioned
    on the context positions; prediction and loss are those of `M.IJEPA`."""

    encoder_class = ConditionedViT

    @torch.no_grad()
    def encode_targets(self, batch: M.MaskedBatch) -> torch.Tensor:
        cond = position_tokens(batch.context_pos, batch.context_sample >= 0, batch.context_sample,
                               batch.images_per_row, self.teacher.cfg.dim)
        return self.teacher_targets(self.teacher(*batch.whole_images(), *cond), batch)

    def encode_context(self, batch: M.MaskedBatch) -> torch.Tensor:
        cond = position_tokens(batch.hidden_pos, batch.is_target, batch.hidden_sample,
                               batch.images_per_row, self.student.cfg.dim)
        return self.student(batch.context_patches, batch.context_pos, batch.context_sample, *cond)
