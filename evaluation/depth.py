"""The depth probe: a linear map from each frozen token to its patch's depths, scored with the usual
monocular-depth metrics after a per-image scale-and-shift alignment, beside the baseline that
knows only where a pixel is."""

import torch

import models as M
from evaluation.logistic import validation_split
from evaluation.stats import mean_and_se


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """Least squares with an L2 penalty `alpha` on the weights (not the bias): x (n, d), y (n, k) ->
    a function mapping features to predictions. With more features than rows (raw pixels) the same
    weights come from the n x n system instead of the d x d one: W = xc^T (xc xc^T + a n I)^-1 yc."""
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    n, d = x.shape
    if d > n:
        W = xc.T @ torch.linalg.solve(xc @ xc.T + alpha * n * torch.eye(n, dtype=x.dtype), yc)
    else:
        W = torch.linalg.solve(xc.T @ xc + alpha * n * torch.eye(d, dtype=x.dtype), xc.T @ yc)
    return lambda z: (z - mean_x) @ W + mean_y


def align_scale_shift(pred: torch.Tensor, true: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per image, the scale s and shift t minimising sum over valid pixels of (s pred + t - true)^2,
    applied: (N, H, W) -> (N, H, W)."""
    w = valid.double()
    n = w.sum((1, 2)).clamp(min=1)
    p, t = pred.double(), true.double()
    mp, mt = (p * w).sum((1, 2)) / n, (t * w).sum((1, 2)) / n
    cov = ((p - mp[:, None, None]) * (t - mt[:, None, None]) * w).sum((1, 2))
    var = (((p - mp[:, None, None]) ** 2) * w).sum((1, 2)).clamp(min=1e-12)
    s = cov / var
    return (s[:, None, None] * (p - mp[:, None, None]) + mt[:, None, None]).float()


def depth_metrics(pred: torch.Tensor, true: torch.Tensor, valid: torch.Tensor) -> dict:
    """AbsRel, RMSE and delta < 1.25 over the valid pixels of each image, after a per-image
    least-squares scale-and-shift alignment of the prediction; means over images, with their
    standard errors."""
    aligned = align_scale_shift(pred, true, valid).clamp(min=1e-3)
    w = valid.float()
    n = w.sum((1, 2)).clamp(min=1)
    absrel = ((aligned - true).abs() / true * w).sum((1, 2)) / n
    rmse = (((aligned - true) ** 2 * w).sum((1, 2)) / n).sqrt()
    delta = ((torch.maximum(aligned / true, true / aligned) < 1.25).float() * w).sum((1, 2)) / n
    out = {}
    for name, v in (("absrel", absrel), ("rmse", rmse), ("delta1", delta)):
        stats = mean_and_se(v)
        out[name], out[f"{name}_se"] = stats["mean"], stats["se"]
    return out


def depth_probe(train_tokens: list, train_depth, test_tokens: list, test_depth, patch_size: int,
                valid_fn, alphas=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), val_fraction: float = 0.2, seed: int = 0) -> dict:
    """A linear map from each token to its patch's p x p depths, fitted by ridge regression on one
    layer's tokens (a list of (N, h*w, D) per layer; layer and alpha chosen on a validation part of
    the training images by mean squared error), scored once on the test images with `depth_metrics`.
    The map predicts each pixel's difference from the training images' mean depth at that position
    (`position_mean_depth`), so it measures what the tokens add to where a pixel is.
    `valid_fn(depth)` marks the pixels that count (e.g. not sky)."""
    N = len(train_depth)
    val, fit = (torch.from_numpy(rows) for rows in validation_split(N, val_fraction, seed))
    prior = train_depth.mean(0, keepdim=True)  # (1, H, W) the per-position mean
    targets = M.patchify((train_depth - prior)[:, None], patch_size).double()  # (N, T, p*p): each token's depths
    flat = lambda t, idx: t[idx].reshape(-1, t.shape[-1]).double()  # noqa: E731

    best = None
    for layer, tokens in enumerate(train_tokens, start=1):
        for alpha in alphas:
            head = fit_ridge(flat(tokens, fit), flat(targets, fit), alpha)
            mse = float(((head(flat(tokens, val)) - flat(targets, val)) ** 2).mean())
            if best is None or mse < best[0]:
                best = (mse, layer, alpha)
    _, layer, alpha = best
    head = fit_ridge(flat(train_tokens[layer - 1], torch.arange(N)), flat(targets, torch.arange(N)), alpha)
    M_, T_, _ = test_tokens[layer - 1].shape
    H, W = test_depth.shape[1:]
    pred = head(test_tokens[layer - 1].reshape(-1, test_tokens[layer - 1].shape[-1]).double()).float()
    pred = pred.reshape(M_, H // patch_size, W // patch_size, patch_size, patch_size).permute(0, 1, 3, 2, 4).reshape(M_, H, W)
    pred = pred + prior
    return {"layer": layer, "alpha": alpha, "val_mse": best[0], "prediction": pred,
            **depth_metrics(pred, test_depth, valid_fn(test_depth))}


def position_mean_depth(train_depth: torch.Tensor, test_depth: torch.Tensor, valid_fn) -> dict:
    """The baseline that knows only where a pixel is: every test image gets the training images'
    mean depth at each pixel position (the scenes have a horizon, so this alone gets far)."""
    pred = train_depth.mean(0, keepdim=True).expand_as(test_depth)
    return {"prediction": pred, **depth_metrics(pred, test_depth, valid_fn(test_depth))}
