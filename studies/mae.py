"""MAE on I-JEPA's backbone: predict the pixels of masked patches instead of the teacher's features.

Masked autoencoders (He et al., CVPR 2022, arXiv 2111.06377) and I-JEPA share a shape: an encoder
sees part of an image, a narrow network fills in the rest. They differ in what is filled in. MAE
regresses the *pixels* of the hidden patches; I-JEPA regresses a teacher's *features* there. This
file is MAE written as a variant of `models.IJEPA`, so that the comparison changes that and
nothing else the method does not require:

    the same encoder     `VisionTransformer`, the same patch embedding and sin-cos positions,
                         run on the visible patches only (no mask tokens in the encoder: MAE's
                         asymmetric design, and I-JEPA's student is the same);
    random masking       `RandomMasking`: a random 75% of the patches are hidden, all of them
                         targets (MAE's default ratio), in place of multi-block masking;
    the decoder          the predictor's architecture (context tokens plus a mask token at each
                         hidden position, a narrow ViT), ending in a linear map to the patch's
                         C*p*p pixel values instead of the encoder's width;
    the targets          each hidden patch's pixels, normalised by the patch's own mean and
                         standard deviation (MAE's `norm_pix_loss`, which its paper finds gives
                         better representations); the loss is the mean squared error over them.

There is no teacher. `train.py`, the checkpoints and every evaluation read a `teacher`, so MAE
keeps a copy of its encoder there (`update_teacher` copies it after each step): probing the MAE
"teacher" or "student" measures the same encoder.

    train.py --method mae --loss mse                 # --mask-ratio 0.75, --predictor-depth for the decoder
    reconstruct(model, images, RandomMasking(), g)   # what it makes of the hidden patches, as pictures
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

import models as M

MASK_RATIO = 0.75  # MAE's default: a quarter of the patches is all the encoder sees


@dataclass
class RandomMasking:
    """MAE's masking: a random `ratio` of the patches is hidden and every hidden patch is a target;
    the rest is the context. The number hidden is round(ratio * h * w), kept between 1 and
    h * w - 1 so that there is always something to see and something to predict."""

    ratio: float = MASK_RATIO

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise ValueError(f"--mask-ratio must be between 0 and 1 (exclusive), got {self.ratio}")

    def __call__(self, h: int, w: int, g: torch.Generator) -> M.Mask:
        n = h * w
        hidden = min(n - 1, max(1, round(self.ratio * n)))
        order = torch.randperm(n, generator=g)
        return M.Mask(context=order[hidden:].sort().values, target=order[:hidden].sort().values)


class PixelDecoder(M.Predictor):
    """The predictor's architecture with a pixel head: predictions (B, Lq, C*p*p), one patch's
    pixel values per query slot, in `models.patchify`'s channel-last order."""

    def __init__(self, cfg: M.ViTConfig, encoder_dim: int, pixels: int):
        super().__init__(cfg, encoder_dim)
        self.proj = nn.Linear(cfg.dim, pixels)  # the head: width -> pixels, in place of width -> encoder width
        nn.init.trunc_normal_(self.proj.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(self.proj.bias)


def patch_statistics(patches: torch.Tensor, eps: float = 1e-6) -> tuple:
    """Patches (..., C*p*p) -> each patch's own mean and standard deviation, (..., 1) each
    (population variance plus eps under the root, as MAE's norm_pix_loss)."""
    mean = patches.mean(-1, keepdim=True)
    return mean, torch.sqrt(patches.var(-1, keepdim=True, unbiased=False) + eps)


def normalized_pixels(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Patches (..., C*p*p) -> each patch minus its own mean, over its own standard deviation
    (`patch_statistics`): the regression targets."""
    mean, std = patch_statistics(patches, eps)
    return (patches - mean) / std


class MAE(M.IJEPA):
    """A masked autoencoder in I-JEPA's four stages: 1. the targets are the hidden patches'
    normalised pixels (no network), 2. the encoder sees the visible patches, 3. the decoder predicts
    every hidden patch's pixels, 4. the loss (train.py requires MSE for MAE)."""

    def make_predictor(self) -> nn.Module:
        pixels = self.cfg.in_chans * self.cfg.patch_size ** 2
        return PixelDecoder(self.cfg.predictor_config(), self.student.cfg.dim, pixels)

    @torch.no_grad()
    def encode_targets(self, batch: M.MaskedBatch) -> torch.Tensor:
        """1. Targets: the pixels of the hidden stream, each patch normalised on its own (B, Lh, C*p*p)."""
        return normalized_pixels(batch.hidden_patches)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """No teacher: the slot holds a copy of the encoder, whatever the momentum, so that every
        evaluation that reads the teacher measures the encoder MAE trained."""
        self.teacher.load_state_dict(self.student.state_dict())


@torch.no_grad()
def reconstruct(model: MAE, images: torch.Tensor, masking, g: torch.Generator, normalize=None) -> dict:
    """What MAE makes of images (N, C, H, W) with a mask drawn by `masking` from `g`: {"visible": the
    images with their hidden patches blanked (0), "reconstruction": the visible patches with the
    decoder's predictions in the hidden ones}, both (N, C, H, W) in the images' own units. The
    decoder predicts each patch's pixels normalised by the patch's own mean and spread
    (`normalized_pixels`), so they are drawn with the true patch's mean and spread put back, as the
    MAE paper draws them: the shape of the prediction, not its brightness, is what it made.
    `normalize` (e.g. data.normalize): applied to the images before the model sees them (and undone
    by the caller if it wants pictures)."""
    p = model.cfg.patch_size
    x = normalize(images) if normalize else images
    batch = M.mask_images(x, p, masking, g)
    was_training = model.training
    out = model.eval()(batch)
    model.train(was_training)
    N, (h, w) = len(images), batch.grids[0].tolist()
    mean, std = patch_statistics(batch.hidden_patches)
    predicted = out.prediction * std + mean  # (B, Lh, C*p*p) back in the images' units

    def scatter(patches, pos, sample, keep, into):  # tokens (B, L, C*p*p) -> their images' rasters (N, h*w, C*p*p)
        into[sample[keep], pos[keep][:, 0] * w + pos[keep][:, 1]] = patches[keep]

    visible = torch.zeros(N, h * w, x.shape[1] * p * p)
    scatter(batch.context_patches, batch.context_pos, batch.context_sample, batch.context_sample >= 0, visible)
    filled = visible.clone()
    scatter(predicted, batch.hidden_pos, batch.hidden_sample, batch.is_target, filled)
    return {"visible": M.unpatchify(visible, (h, w), p), "reconstruction": M.unpatchify(filled, (h, w), p)}
