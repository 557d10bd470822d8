"""RankMe (Garrido et al. 2023): the effective rank of a set of embeddings, a label-free sign of how
many directions the features use (1: collapsed). `train.py` logs it during training."""

import torch


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe: exp of the entropy of the normalised singular values of a (n, D) feature matrix;
    between 1 (collapsed to one direction) and min(n, D)."""
    s = torch.linalg.svdvals(features.float())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def image_rankme(encoder, images: torch.Tensor) -> float:
    """RankMe as its paper defines it (Garrido et al. 2023), on image-level embeddings: here the
    mean-pooled final tokens of `encoder` for a fixed set of images (N, C, H, W), N >= D for a
    full-range value."""
    was_training = encoder.training
    embeddings = encoder.eval().encode(images).float().mean(1)  # (N, D)
    encoder.train(was_training)
    return rankme(embeddings)
