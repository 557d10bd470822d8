"""Two label-free effective ranks of an encoder's embeddings, signs of how many directions the
features use (1: collapsed). `train.py` logs RankMe during training.

    RankMe (Garrido et al. 2023)  the effective rank of the embeddings themselves;
    LiDAR (Thilak et al. 2023)    the effective rank of the linear-discriminant (LDA) matrix of a
                                  surrogate task: each image is a class, several masked views of
                                  it are its samples. It counts the directions along which images
                                  differ *more than* views of one image do, and is unchanged by
                                  any invertible linear map of the features (RankMe is not).
"""

import torch

import models as M


def effective_rank(values: torch.Tensor, eps: float = 1e-7) -> float:
    """exp of the entropy of non-negative values normalised to sum 1: between 1 (one value holds
    everything) and their number (all equal)."""
    p = values / values.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe: the effective rank of the singular values of a (n, D) feature matrix; between 1
    (collapsed to one direction) and min(n, D)."""
    return effective_rank(torch.linalg.svdvals(features.float()), eps)


@torch.no_grad()
def image_embeddings(encoder, images: torch.Tensor) -> torch.Tensor:
    """Image-level embeddings (N, D): the mean-pooled final tokens of `encoder` for images (N, C, H, W)."""
    was_training = encoder.training
    embeddings = encoder.eval().encode(images).float().mean(1)  # (N, D)
    encoder.train(was_training)
    return embeddings


def image_rankme(encoder, images: torch.Tensor) -> float:
    """RankMe as its paper defines it (Garrido et al. 2023), on image-level embeddings
    (`image_embeddings`) of a fixed set of images (N, C, H, W), N >= D for a full-range value."""
    return rankme(image_embeddings(encoder, images))


def lidar(embeddings: torch.Tensor, delta: float = 1e-4, eps: float = 1e-7) -> float:
    """LiDAR of embeddings (N, q, D): N classes (images) of q samples (views) each, q >= 2.

    Between-class covariance S_b of the class means around the grand mean (N - 1 in the
    denominator), within-class covariance S_w of the samples around their class means
    (N (q - 1) in the denominator) plus delta * I, the LDA matrix S_w^(-1/2) S_b S_w^(-1/2), and the
    effective rank of its eigenvalues. Computed in float64."""
    if embeddings.dim() != 3 or embeddings.shape[1] < 2 or embeddings.shape[0] < 2:
        raise ValueError(f"LiDAR needs embeddings (images, views, D) with at least 2 images and 2 views each, "
                         f"got shape {tuple(embeddings.shape)}")
    e = embeddings.double()
    N, q, D = e.shape
    means = e.mean(1)  # (N, D) each class's mean
    between = means - means.mean(0)  # (N, D)
    s_b = between.T @ between / (N - 1)  # (D, D)
    within = (e - means[:, None]).reshape(N * q, D)
    s_w = within.T @ within / (N * (q - 1)) + delta * torch.eye(D, dtype=e.dtype)
    values, vectors = torch.linalg.eigh(s_w)
    inv_sqrt = vectors @ torch.diag(values.rsqrt()) @ vectors.T  # S_w^(-1/2), symmetric
    lda = inv_sqrt @ s_b @ inv_sqrt
    return effective_rank(torch.linalg.eigvalsh(lda).clamp(min=0), eps)


@torch.no_grad()
def masked_view_embeddings(model, images: torch.Tensor, masking, views: int, seed: int = 0) -> torch.Tensor:
    """Images (N, C, H, W) -> (N, views, D): each view is the student of `model` (an IJEPA) on the
    context of a fresh mask from `masking`, its tokens mean-pooled: the student as it sees an image
    in training, through `model.encode_context`, so that an encoder-conditioned student
    (studies/ec_ijepa.py) also gets the target positions it was trained with. The masks come from
    one generator seeded with `seed`, so every model gets the same views."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(views):
        batch = M.mask_images(images, model.cfg.patch_size, masking, g)
        tokens = model.encode_context(batch)  # (N, Lc, D), one image a row
        real = (batch.context_sample >= 0)[..., None]  # (N, Lc, 1): padding out of the mean
        out.append((tokens * real).sum(1) / real.sum(1))
    model.train(was_training)
    return torch.stack(out, 1)  # (N, views, D)
