"""Evaluating a frozen encoder: features, the linear and k-NN probes, the depth probe, RankMe, and
the analysis of loss maps and token energy (the feature-normalisation study).

The probe protocol, used everywhere in this project: mean-pool the patch tokens of each block's
output (before the encoder's last layer) and of the final output, standardise the features, fit a
multinomial logistic regression whose regularisation is chosen on a validation split of the
*training* images, and score once on the test images. The best layer is chosen on validation too;
the test split never takes part in a choice. Beside it: a k-nearest-neighbour probe (cosine, k = 20)
and a depth probe (a linear map from each token to its patch's depths).

    python evaluate.py probe --json probe.json       # the reference model on the built-in scenes
    python evaluate.py probe --checkpoint checkpoints/demo/checkpoint.pt --dataset scenes --json probe.json
    python evaluate.py probe --checkpoint CKPT --dataset path/to/folder   # class sub-folders; train/ and test/ if present
    python evaluate.py depth --checkpoint CKPT --dataset scenes           # or nyu (data/nyu_depth_v2_labeled.mat)

Every run probes, side by side and on the same splits: the checkpoint's teacher and student, the
same network at its initial weights (re-created from the checkpoint's seed), and raw pixels.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score
from tqdm import tqdm

import data
import models as M

# -----------------------------------------------------------------------------------------------
# 1. Features


def check_pool_grid(grid: tuple, cells: int) -> None:
    """Raise a ValueError unless `cells` divides both sides of the h x w patch grid."""
    h, w = grid
    if cells < 1 or h % cells or w % cells:
        raise ValueError(f"pool grid {cells}: must divide the {h} x {w} patch grid (try 1, or a divisor of both sides)")


def grid_pool(tokens: torch.Tensor, grid: tuple, cells: int = 1) -> torch.Tensor:
    """Tokens (B, h*w, D) in raster order over an h x w patch grid -> (B, cells*cells*D): the mean
    token of each cell of a cells x cells split of the grid, cells in raster order. cells=1 is the
    plain mean of all tokens, the probe feature of the I-JEPA paper; more cells keep where things
    are, which the plain mean throws away (a digit's class lies in where its strokes are)."""
    b, n, d = tokens.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"{n} tokens do not form a {h} x {w} grid")
    check_pool_grid(grid, cells)
    cell = tokens.view(b, cells, h // cells, cells, w // cells, d).mean((2, 4))  # (B, cells, cells, D)
    return cell.flatten(1)                                                        # (B, cells*cells*D)


@torch.no_grad()
def layer_features(encoder, images: torch.Tensor, batch_size: int = 256, normalize=None, progress=False,
                   pool_grid: int = 1) -> list:
    """Mean-pooled tokens of every block and of the final output, for all images.

    images (N, C, H, W) -> list of depth + 1 float32 arrays (N, D): blocks 1..depth (before the
    encoder's last layer), then the final output (after it). With pool_grid k > 1 the tokens are
    pooled over a k x k grid of cells instead (`grid_pool`): arrays (N, k*k*D). `normalize` is
    applied to each image batch first (e.g. data.normalize). The encoder's own `encode` is used,
    so an encoder that encodes in its own way (ec_ijepa.py) is probed as it encodes."""
    p = encoder.cfg.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    check_pool_grid(grid, pool_grid)  # before any encoding
    return [torch.cat(chunks).numpy() for chunks in zip(*_batched_layers(encoder, images, batch_size, normalize, progress,
                                                                          lambda t: grid_pool(t.float(), grid, pool_grid).cpu()))]


@torch.no_grad()
def token_features(encoder, images: torch.Tensor, batch_size: int = 256, normalize=None, progress=False) -> list:
    """Like `layer_features` but every token kept: a list of depth + 1 tensors (N, h*w, D), raster order."""
    return [torch.cat(chunks) for chunks in zip(*_batched_layers(encoder, images, batch_size, normalize, progress,
                                                                  lambda t: t.float().cpu()))]


@torch.no_grad()
def final_tokens(encoder, images: torch.Tensor, batch_size: int = 256, normalize=None, progress=False) -> torch.Tensor:
    """The encoder's final output tokens only (after its last layer): (N, h*w, D), raster order."""
    return torch.cat([layers[-1].float().cpu() for layers in
                      _batched_layers(encoder, images, batch_size, normalize, progress, lambda t: t)])


def _batched_layers(encoder, images, batch_size, normalize, progress, reduce):
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    starts = range(0, len(images), batch_size)
    for i in tqdm(starts, desc="features", disable=not progress or len(starts) < 4, mininterval=5):
        x = images[i:i + batch_size].to(device)
        out, layers = encoder.encode(normalize(x) if normalize else x, return_layers=True)
        yield [reduce(t) for t in (*layers, out)]
    encoder.train(was_training)


# -----------------------------------------------------------------------------------------------
# 2. The linear probe and the k-NN probe


@dataclass
class ProbeResult:
    top1: float  # accuracy on the test split
    macro_f1: float
    C: float  # chosen inverse regularisation strength
    val_top1: float  # accuracy on the validation split at that C
    predictions: np.ndarray  # test predictions, for confusion matrices
    converged: bool  # False when a fit stopped before its gradient was shorter than tol


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float, max_iter: int = 1000, tol: float = 1e-4,
                 start=None):
    """Multinomial logistic regression, full batch, by L-BFGS. The objective is scikit-learn's
    (C x the summed log-loss + half the squared norm of the weights, the bias unpenalised), divided
    by the number of samples, so the minimum is the same. The search stops when the gradient's length
    is below `tol`: stricter than scikit-learn's rule (its largest component below tol, default 1e-4),
    and the same in any rotated basis of the features. `start` (weights, bias) warm-starts the search;
    the problem is convex, so the optimum does not depend on it. Returns (weights, bias, converged).

    With P the softmax probabilities and Y the one-hot labels, the gradient is
    d/dW = x^T (P - Y) / n + W / (C n) and d/db = sum over samples of (P - Y) / n.

    Preconditioning: L-BFGS walks in rescaled weights u = W sqrt(h), with h, per feature, the
    objective's curvature at the start (every class at probability 1/k): mean(x^2) / k + 1 / (C n).
    When the features are uncorrelated (prepare_features rotates them into the eigenvectors of their
    covariance) that is the whole Hessian at the start, so every direction looks alike to L-BFGS.
    Without it, a C = 10 fit on 512 correlated features took hundreds of steps; with it, tens."""
    n, d = x.shape
    curvature = torch.cat([x.pow(2).mean(0) / n_classes + 1.0 / (C * n), x.new_full((1,), 1.0 / n_classes)])
    scale = curvature.rsqrt()[:, None]  # (d + 1, 1): theta = u * scale
    theta = x.new_zeros(d + 1, n_classes)  # the weights (d rows), then the bias (one row)
    if start is not None:
        theta[:d], theta[d] = start[0], start[1]
    u = (theta / scale).requires_grad_(True)  # for the optimiser's bookkeeping; the closure sets .grad itself
    onehot = F.one_hot(y, n_classes).to(x.dtype)  # (n, k)
    penalty = 1.0 / (C * n)
    grad_norm = [math.inf]  # of the objective in W and b, at the last point evaluated

    @torch.no_grad()
    def objective():
        theta = u * scale
        W, b = theta[:d], theta[d]
        log_p = torch.addmm(b, x, W).log_softmax(1)  # (n, k)
        loss = -(log_p * onehot).sum() / n + 0.5 * penalty * (W * W).sum()
        residual = (log_p.exp() - onehot) / n  # (n, k): d loss / d logits
        grad = torch.empty_like(theta)
        torch.addmm(W, x.T, residual, beta=penalty, out=grad[:d])  # x^T residual + penalty * W
        grad[d] = residual.sum(0)
        grad_norm[0] = float(grad.norm())
        u.grad = grad * scale  # the chain rule through theta = u * scale
        return loss

    chunk = 10  # L-BFGS iterations between checks of the stopping rule (torch's own rule is a different one)
    opt = torch.optim.LBFGS([u], lr=1, max_iter=chunk, max_eval=100 * chunk, tolerance_grad=0, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")
    objective()
    steps = 0
    while grad_norm[0] > tol and steps < max_iter:
        asked = opt.param_groups[0]["max_iter"] = min(chunk, max_iter - steps)
        opt.step(objective)
        done = opt.state[u]["n_iter"] - steps
        steps += done
        objective()  # the gradient where this chunk ended
        if done < asked:  # L-BFGS stopped early: no further progress is possible in floating point
            break
    theta = (u * scale).detach()
    return theta[:d].clone(), theta[d].clone(), grad_norm[0] <= tol


@dataclass
class Basis:
    """How a feature set is shown to the logistic regression: standardised by the mean and standard
    deviation of the rows it is fitted on, then rotated into the eigenvectors of their covariance, so
    that the coordinates are uncorrelated (which makes fit_logistic's preconditioning exact at the
    start). The rotation is orthonormal, so the squared norm of the weights, and with it the
    objective and its optimum, are unchanged. With more features than rows (raw pixels) it keeps only
    the rows' span, where the L2-penalised optimum lies: each step then costs n x n, not n x d."""
    mean: torch.Tensor  # (d,)
    std: torch.Tensor  # (d,)
    rotation: torch.Tensor  # (d, r), orthonormal columns; r = min(d, n)

    @classmethod
    def from_rows(cls, x: torch.Tensor) -> tuple:
        """Rows (n, d) -> (their Basis, their coordinates (n, r))."""
        mean, std = x.mean(0), x.std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))  # constant features stay zero, as in scikit-learn
        s = (x - mean) / std  # (n, d)
        span = None
        if s.shape[1] > s.shape[0]:  # the rows' span: s^T = span @ r, span (d, n) orthonormal
            span, r = torch.linalg.qr(s.T)
            s = r.T  # (n, n): the rows in that basis
        _, eigenvectors = torch.linalg.eigh(s.T @ s)  # of the covariance (times n)
        rotation = eigenvectors if span is None else span @ eigenvectors
        return cls(mean, std, rotation), s @ eigenvectors

    def coordinates(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features (m, d) -> their coordinates (m, r)."""
        return ((x - self.mean) / self.std) @ self.rotation

    def to_features(self, W: torch.Tensor, b: torch.Tensor) -> tuple:
        """A linear map (W, b) on the coordinates -> the same map on the raw features."""
        W_raw = (self.rotation @ W) / self.std[:, None]  # (d, k)
        return W_raw, b - self.mean @ W_raw

    def from_features(self, W_raw: torch.Tensor, b_raw: torch.Tensor) -> tuple:
        """A linear map on the raw features -> the map on the coordinates that agrees with it on the
        rows' span (everywhere, when d <= n)."""
        return self.rotation.T @ (W_raw * self.std[:, None]), b_raw + self.mean @ W_raw


@dataclass
class PreparedSet:
    """One feature set (e.g. one layer) made ready for probing any label: the fit part of the
    training set in the basis of its own rows, the validation part in the same basis, and for the
    refit, the whole training set in its basis with the test set in the same."""
    fit: torch.Tensor  # (n_fit, r)
    val: torch.Tensor  # (n_val, r)
    train: torch.Tensor  # (n, r')
    test: torch.Tensor  # (m, r')
    fit_basis: Basis
    train_basis: Basis


@dataclass
class PreparedFeatures:
    """One or more feature sets (e.g. every layer of an encoder) prepared once for every label: the
    split of the training set into fit and validation parts (the same rows for every set) and a
    PreparedSet per feature set. For raw pixels the bases are the expensive part."""
    sets: list  # of PreparedSet
    fit_rows: torch.Tensor  # indices of the fit and validation parts in the training set
    val_rows: torch.Tensor


def validation_split(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple:
    """(validation rows, fit rows) of a training set of n: a seeded random `val_fraction` of it
    (at least one row) for choosing C and the layer, the rest for fitting."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    return order[:n_val], order[n_val:]


def prepare_features(train_sets: list, test_sets: list, val_fraction: float = 0.2, seed: int = 0) -> PreparedFeatures:
    """Lists of P arrays (n, d) and (m, d) with the same d -> PreparedFeatures. The validation part
    is a seeded random fifth of the training set (the same rows for every feature set and label)."""
    as64 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    train_sets, test_sets = [as64(a) for a in train_sets], [as64(a) for a in test_sets]
    n = len(train_sets[0])
    if any(len(a) != n for a in train_sets) or len({len(a) for a in test_sets}) != 1:
        raise ValueError("every feature set needs the same number of training and of test rows")
    val, fit = (torch.from_numpy(rows) for rows in validation_split(n, val_fraction, seed))
    sets = []
    for a, b in zip(train_sets, test_sets):
        (fit_basis, fit_x), (train_basis, train_x) = Basis.from_rows(a[fit]), Basis.from_rows(a)
        sets.append(PreparedSet(fit=fit_x, val=fit_basis.coordinates(a[val]), train=train_x,
                                test=train_basis.coordinates(b), fit_basis=fit_basis, train_basis=train_basis))
    return PreparedFeatures(sets=sets, fit_rows=fit, val_rows=val)


def probe_prepared(prepared: PreparedFeatures, train_y, test_y, Cs=(0.01, 0.1, 1.0, 10.0), max_iter: int = 1000) -> list:
    """Logistic regression on each prepared feature set: C chosen on the validation part, then refit
    on the whole training set at that C and scored once on the test set. A ProbeResult per set."""
    train_y, test_y = torch.as_tensor(np.asarray(train_y)).long(), torch.as_tensor(np.asarray(test_y)).long()
    if len(prepared.fit_rows) + len(prepared.val_rows) != len(train_y) or len(prepared.sets[0].test) != len(test_y):
        raise ValueError("features and labels differ in length")
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    y_fit, y_val = train_y[prepared.fit_rows], train_y[prepared.val_rows]
    results = []
    for s in prepared.sets:
        converged, fits, scores = True, [], []
        for C in Cs:  # in increasing order, each fit starts from the last one's optimum: fewer steps, the same optimum
            W, b, ok = fit_logistic(s.fit, y_fit, n_classes, C, max_iter, start=fits[-1] if fits else None)
            converged = converged and ok
            fits.append((W, b))
            scores.append(float(((s.val @ W + b).argmax(1) == y_val).double().mean()))
        best = int(np.argmax(scores))
        # the refit on the whole training set at the chosen C starts from that C's fit, carried over
        # to the whole set's standardisation and basis through the raw features
        start = s.train_basis.from_features(*s.fit_basis.to_features(*fits[best]))
        W, b, ok = fit_logistic(s.train, train_y, n_classes, Cs[best], max_iter, start=start)
        pred = (s.test @ W + b).argmax(1).numpy()
        results.append(ProbeResult(top1=float((pred == test_y.numpy()).mean()), C=Cs[best], val_top1=scores[best],
                                   macro_f1=float(f1_score(test_y.numpy(), pred, average="macro")), predictions=pred,
                                   converged=converged and ok))
    return results


def linear_probe(train_x, train_y, test_x, test_y, val_fraction: float = 0.2,
                 Cs=(0.01, 0.1, 1.0, 10.0), seed: int = 0, max_iter: int = 1000) -> ProbeResult:
    """Logistic regression on standardised features; C chosen on a held-out part of the training
    set, then refit on the whole training set and scored once on the test set."""
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("features and labels differ in length")
    return probe_prepared(prepare_features([train_x], [test_x], val_fraction, seed), train_y, test_y, Cs, max_iter)[0]


def knn_predict(train_x, train_y, query_x, k: int = 20) -> np.ndarray:
    """Majority vote of the k training points of highest cosine similarity (ties: the class whose
    votes have the larger summed similarity)."""
    a = F.normalize(torch.as_tensor(np.asarray(train_x), dtype=torch.float32), dim=1)
    q = F.normalize(torch.as_tensor(np.asarray(query_x), dtype=torch.float32), dim=1)
    y = torch.as_tensor(np.asarray(train_y)).long()
    sim, idx = (q @ a.T).topk(min(k, len(a)), dim=1)  # (Q, k)
    n_classes = int(y.max()) + 1
    votes = torch.zeros(len(q), n_classes).scatter_add_(1, y[idx], torch.ones_like(sim))
    weight = torch.zeros(len(q), n_classes).scatter_add_(1, y[idx], sim)
    return (votes + 1e-3 * weight / (weight.abs().max() + 1e-12)).argmax(1).numpy()


def knn_probe(train_x, train_y, test_x, test_y, k: int = 20) -> float:
    """Top-1 accuracy of `knn_predict` on the test set."""
    return float((knn_predict(train_x, train_y, test_x, k) == np.asarray(test_y)).mean())


@dataclass
class LayerProbe:
    layer: int  # 1..depth for blocks, depth + 1 for the final output
    result: ProbeResult
    val_by_layer: list  # validation accuracy of every layer
    test_by_layer: list  # test accuracy of every layer (reported, never used to choose)


def probe_best_layer(train_layers: list, train_y, test_layers: list, test_y, seed: int = 0, prepared=None,
                     **kwargs) -> LayerProbe:
    """Probe every layer; the layer with the best validation accuracy is scored on
    test. `prepared`: the layers already made ready by prepare_features (to probe several labels)."""
    prepared = prepared or prepare_features(train_layers, test_layers, seed=seed)
    results = probe_prepared(prepared, train_y, test_y, **kwargs)
    val = [r.val_top1 for r in results]
    best = int(np.argmax(val))
    return LayerProbe(layer=best + 1, result=results[best], val_by_layer=val, test_by_layer=[r.top1 for r in results])


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n test images."""
    return float(np.sqrt(accuracy * (1 - accuracy) / n))


def prepare_encoder(train_layers: list, test_layers: list, seed: int = 0, concat_last: int = 4) -> dict:
    """What probe_features needs of one encoder's layers, whatever the label: the layers prepared
    for the linear probe, and the concatenation of the last `concat_last` blocks."""
    out = {"layers": prepare_features(train_layers, test_layers, seed=seed)}
    blocks = len(train_layers) - 1
    if concat_last and blocks >= concat_last:  # concat_last=0: no concatenation probe
        cat = lambda layers: np.concatenate(layers[blocks - concat_last:blocks], axis=1)  # noqa: E731
        out["concat"] = prepare_features([cat(train_layers)], [cat(test_layers)], seed=seed)
    return out


def probe_features(train_layers: list, train_y, test_layers: list, test_y, seed: int = 0, concat_last: int = 4,
                   prepared=None) -> dict:
    """The whole classification probe of one encoder (or of raw pixels: a list of one array):
    linear probe per layer (best on validation), on the concatenation of the last `concat_last`
    blocks, and k-NN per layer (best on validation, on a validation split of the training set).
    `prepared`: prepare_encoder's output for these layers, made once for several labels."""
    prepared = prepared or prepare_encoder(train_layers, test_layers, seed, concat_last)
    best = probe_best_layer(train_layers, train_y, test_layers, test_y, prepared=prepared["layers"])
    out = {"best_top1": best.result.top1, "best_layer": best.layer, "macro_f1": best.result.macro_f1,
           "per_layer_top1": best.test_by_layer, "predictions": best.result.predictions,
           "stderr": standard_error(best.result.top1, len(test_y))}
    if "concat" in prepared:
        out["concat_top1"] = probe_prepared(prepared["concat"], train_y, test_y)[0].top1
    val, fit = prepared["layers"].val_rows.numpy(), prepared["layers"].fit_rows.numpy()
    train_y = np.asarray(train_y)
    knn_val = [knn_probe(a[fit], train_y[fit], a[val], train_y[val]) for a in train_layers]
    k_best = int(np.argmax(knn_val))
    out["knn_layer"] = k_best + 1
    out["knn_top1"] = knn_probe(train_layers[k_best], train_y, test_layers[k_best], test_y)
    return out


# -----------------------------------------------------------------------------------------------
# 3. A cache of features, keyed by what made them


FEATURES_VERSION = 2  # raise when the feature extraction changes: every cached file becomes stale


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def cached(cache_dir, key: dict, compute):
    """compute() once per key: the key (checkpoint digest, encoder, dataset, split, sizes...) names
    the file, so features of another checkpoint or dataset are never read back. No cache_dir: compute."""
    if not cache_dir:
        return compute()
    name = hashlib.sha256(json.dumps({**key, "version": FEATURES_VERSION}, sort_keys=True).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"features-{name}.pt")
    if os.path.exists(path):
        try:
            saved = torch.load(path, weights_only=True)
        except Exception:  # truncated, or written in another format: computed again and replaced
            saved = {}
        if saved.get("key") == {**key, "version": FEATURES_VERSION}:
            return saved["value"]
    value = compute()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: parallel probes may fill the same entry
    torch.save({"key": {**key, "version": FEATURES_VERSION}, "value": value}, tmp)
    os.replace(tmp, path)
    return value


# -----------------------------------------------------------------------------------------------
# 4. The depth probe


def patch_targets(depth: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, H, W) depth maps -> (N, h*w, p*p): each token's patch of depths, raster order."""
    N, H, W = depth.shape
    p = patch_size
    return depth.reshape(N, H // p, p, W // p, p).permute(0, 1, 3, 2, 4).reshape(N, (H // p) * (W // p), p * p)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """Least squares with an L2 penalty `alpha` on the weights (not the bias): x (n, d), y (n, k) ->
    a function mapping features to predictions."""
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc = x - mean_x
    W = torch.linalg.solve(xc.T @ xc + alpha * len(x) * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ (y - mean_y))
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
        out[name] = float(v.mean())
        out[f"{name}_se"] = float(v.std() / np.sqrt(len(v))) if len(v) > 1 else 0.0
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
    order = torch.from_numpy(np.random.default_rng(seed).permutation(N))
    n_val = max(1, int(round(val_fraction * N)))
    val, fit = order[:n_val], order[n_val:]
    prior = train_depth.mean(0, keepdim=True)  # (1, H, W) the per-position mean
    targets = patch_targets(train_depth - prior, patch_size).double()  # (N, T, p*p)
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


# -----------------------------------------------------------------------------------------------
# 5. RankMe


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


# -----------------------------------------------------------------------------------------------
# 6. The supervised ceiling


def supervised_ceiling(train_x, train_y, test_x, test_y, classes, minutes, patch, seed=0, batch=128, lr=1e-3):
    """The supervised ceiling: the same `micro` encoder with a linear head on its mean-pooled
    output, trained on the labels for `minutes` (cosine learning rate over the time budget, AdamW,
    no augmentation). Returns (test top-1, steps taken)."""
    torch.manual_seed(seed)
    encoder = M.VisionTransformer(M.JEPAConfig(model="micro", patch_size=patch).encoder_config())
    head = torch.nn.Linear(encoder.cfg.dim, classes)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    start, steps = time.perf_counter(), 0
    budget = minutes * 60
    while (elapsed := time.perf_counter() - start) < budget:
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * elapsed / budget))
        idx = torch.randint(len(train_x), (batch,), generator=g)
        logits = head(encoder.encode(data.normalize(train_x[idx])).mean(1))
        loss = F.cross_entropy(logits, train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    encoder.eval()
    with torch.no_grad():
        pred = torch.cat([head(encoder.encode(data.normalize(test_x[i:i + 256])).mean(1)).argmax(1)
                          for i in range(0, len(test_x), 256)])
    return float((pred == test_y).float().mean()), steps


# -----------------------------------------------------------------------------------------------
# 7. Loss maps, token energy and the checkerboard
#
# The feature-normalisation study (issue 23) tests three claims of the feature-normalisation paper
# on models that differ only in `feature_norm`:
#   1. LayerNorm of the teacher's features gives every token the same norm, erasing an "energy
#      hierarchy" in which high-energy tokens mark the semantically important regions: measured by
#      how well the L2 norm of the teacher's tokens *before* the feature norm picks out the main
#      object's patches (ROC AUC), beside where objects usually are (the per-position mean energy)
#      and beyond it (energy minus that mean); and whether the targets keep it (the same AUCs of the
#      targets' norms, after the feature norm).
#   2. Models trained on LayerNorm targets show checkerboard-like artifacts in their loss maps:
#      measured on the dataset-mean loss at each patch position, by the contrast between the two
#      colours of a checkerboard laid over it, as a z-score against shuffled positions.
#   3. DynTanh targets give a longer-tailed loss distribution: the 99th over the 50th percentile of
#      the losses, per token and per image.
# Beside them, image-level RankMe of the teacher (`image_rankme`, section 5).


@dataclass
class LossMaps:
    """Every predicted token's loss for N images of one resolution, over K masks per image."""

    loss_sum: torch.Tensor  # (N, h, w) float64: each patch's summed loss over the masks that predicted it
    count: torch.Tensor  # (N, h, w) int64: how many of the K masks predicted it (0: never)
    token_loss: torch.Tensor  # (T,) every predicted token's loss, all K masks: the per-token distribution


def scatter_loss_maps(token_loss: torch.Tensor, token_image: torch.Tensor, token_pos: torch.Tensor,
                      n_images: int, grid: tuple) -> tuple:
    """Per-token losses (T,), each token's image (T,) in 0..n_images-1 and its (row, col) (T, 2) ->
    (loss_sum, count), each (n_images, h, w): the summed loss and the number of tokens at each patch.
    A patch predicted by several masks adds up; one never predicted keeps 0 and 0."""
    h, w = grid
    index = (token_image.long() * h + token_pos[:, 0].long()) * w + token_pos[:, 1].long()  # into (N*h*w)
    loss_sum = torch.zeros(n_images * h * w, dtype=torch.float64).index_add_(0, index, token_loss.double())
    count = torch.zeros(n_images * h * w, dtype=torch.long).index_add_(0, index, torch.ones_like(index))
    return loss_sum.view(n_images, h, w), count.view(n_images, h, w)


def mean_loss_map(loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Summed losses and counts (..., h, w) -> the mean loss at each patch (..., h, w); NaN where
    the patch was never predicted (no mask made it a target, so there is no loss to show)."""
    return torch.where(count > 0, loss_sum / count.clamp(min=1), torch.nan)


def dataset_loss_map(loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(N, h, w) -> (h, w): the mean over images of each image's mean loss at that patch position.
    Every image weighs the same; an image that never predicted a position is left out of that
    position's mean (NaN where no image predicted it)."""
    return mean_loss_map(loss_sum, count).nanmean(0)


def image_losses(loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(N, h, w) -> (N,): each image's mean loss over every token predicted in it (all K masks):
    the per-image loss distribution. NaN for an image with no predicted token."""
    total = count.sum((1, 2))
    return torch.where(total > 0, loss_sum.sum((1, 2)) / total.clamp(min=1), torch.nan)


@torch.no_grad()
def loss_maps(model: M.IJEPA, images: torch.Tensor, masking, masks: int = 4, seed: int = 0, batch_size: int = 128,
              normalize=None, progress: bool = False) -> LossMaps:
    """Run a whole I-JEPA (its `forward`: teacher, student, predictor and the loss it trains on)
    over images (N, C, H, W) `masks` times, each time with new masks drawn by `masking` (e.g.
    TrainConfig.make_masking()), and scatter every predicted token's loss to its patch.
    All masks come from one torch.Generator seeded with `seed`, in order (pass, image), so one seed
    gives every model the same masks. `normalize` (e.g. data.normalize) is applied to the images
    first, as in training."""
    p = model.cfg.patch_size
    M.check_images(images, p, model.cfg.in_chans)
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    losses, image_ids, positions = [], [], []
    starts = [(k, start) for k in range(masks) for start in range(0, len(images), batch_size)]
    for _, start in tqdm(starts, desc="loss maps", disable=not progress or len(starts) < 4, mininterval=5):
        x = images[start:start + batch_size]
        batch = M.mask_images(normalize(x) if normalize else x, p, masking, g).to(device)  # masks drawn on the CPU
        out = model(batch)
        losses.append(out.token_loss.float().cpu())
        image_ids.append(out.token_sample.cpu() + start)  # the batch numbers its images from 0
        positions.append(out.token_pos.cpu())
    model.train(was_training)
    token_loss = torch.cat(losses)
    return LossMaps(*scatter_loss_maps(token_loss, torch.cat(image_ids), torch.cat(positions), len(images), grid),
                    token_loss)


def tail_ratio(losses: torch.Tensor, upper: float = 0.99, lower: float = 0.5) -> float:
    """How long the tail of a loss distribution is: its `upper` quantile over its `lower` quantile
    (by default the 99th percentile over the median) of a 1-D tensor of losses; NaNs are left out.
    Quantiles interpolate linearly, as numpy.percentile does by default."""
    if losses.ndim != 1:
        raise ValueError(f"expected a 1-D tensor of losses, got shape {tuple(losses.shape)}")
    x = losses.double()
    x = x[~x.isnan()]
    return float(torch.quantile(x, upper) / torch.quantile(x, lower))


def checker_colours(grid: tuple, cell: int = 1) -> torch.Tensor:
    """(h, w) -> (h, w) bool: one colour of a checkerboard of cell x cell patches, True where
    row // cell + col // cell is odd. cell=1 alternates patch by patch (the artifact of the
    paper); cell=2 alternates 2 x 2 blocks of patches."""
    rows, cols = M.grid_coords(*grid).T
    return ((rows // cell + cols // cell) % 2 == 1).reshape(grid)


def _checker_contrast(values: torch.Tensor, white: torch.Tensor) -> torch.Tensor:
    """Cells' values (..., n) and one colour of the checkerboard (n,) bool -> (...,):
    |mean over white cells - mean over black cells| / std over all cells; 0 for a constant map."""
    w = white.to(values.dtype)
    gap = (values * w).sum(-1) / w.sum() - (values * (1 - w)).sum(-1) / (1 - w).sum()
    std = values.std(-1, unbiased=False)
    constant = std <= 1e-12 * values.abs().amax(-1)  # a spread of rounding errors alone is no spread
    return torch.where(constant, 0.0, gap.abs() / std.clamp(min=1e-300))


def checkerboard_score(loss_map: torch.Tensor, cell: int = 1, permutations: int = 200, seed: int = 0) -> dict:
    """How checkered a map (h, w) is, and how far that is from chance.

    contrast: the gap between the mean values of a checkerboard's two colours (`checker_colours`),
    divided by the map's standard deviation, in absolute value: 0 for a constant map (or any map
    whose colours have equal means), 2 for a perfect +-1 checkerboard. The null: the same statistic
    after shuffling the map's cells (`permutations` seeded shuffles), which keeps every value and
    destroys every spatial pattern; z = (contrast - null_mean) / null_std (0 when the null has no
    spread), p = the share of shuffles at least as checkered (counting the map itself).
    Cells that are NaN (never predicted) are left out. A map with no checkerboard at all (contrast 0)
    scores about z = -1.3, not 0: the null's contrasts are absolute values of a roughly normal gap,
    whose mean is sqrt(2/pi) of its spread and whose standard deviation is sqrt(1 - 2/pi) of it.
    Only a large positive z means "checkered"."""
    colour = checker_colours(tuple(loss_map.shape), cell).flatten()
    values = loss_map.double().flatten()
    finite = values.isfinite()
    values, colour = values[finite], colour[finite]
    if colour.all() or not colour.any():
        raise ValueError("the map's finite cells must include both colours of the checkerboard")
    contrast = float(_checker_contrast(values, colour))
    g = torch.Generator().manual_seed(seed)
    shuffles = torch.rand(permutations, len(values), generator=g, dtype=torch.float64).argsort(1)  # (P, n)
    null = _checker_contrast(values[shuffles], colour)  # (P,)
    null_mean, null_std = float(null.mean()), float(null.std())
    z = (contrast - null_mean) / null_std if null_std > 0 else 0.0
    p = (1 + int((null >= contrast - 1e-12).sum())) / (permutations + 1)
    return {"contrast": contrast, "null_mean": null_mean, "null_std": null_std, "z": z, "p": p, "cell": cell}


@torch.no_grad()
def token_energy(encoder, images: torch.Tensor, batch_size: int = 256, normalize=None, target: str | None = None) -> torch.Tensor:
    """Token energy: images (N, C, H, W) -> the L2 norm of each patch token (N, h, w).

    By default read from the output of the encoder's last block, the last entry of `encode`'s
    per-block list: before the encoder's last layer (`VisionTransformer.norm`: the affine LayerNorm,
    or DynTanh) and so before `M.apply_feature_norm`. After those, LayerNorm would have given every
    token the same norm, which is the claim under test. (With batchnorm and none, the last layer is
    the identity and this is the teacher's output itself.) `target` (a feature norm's name, e.g. the
    model's cfg.feature_norm): the norm of the regression target instead, the encoder's final output
    after `M.apply_feature_norm`, which is what the predictor is trained to match."""
    p = encoder.cfg.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)

    def norms(layers):  # _batched_layers yields [block 1, ..., last block, final output]
        if target is None:
            return layers[-2].float().norm(dim=-1).cpu()
        out = layers[-1].float()
        return M.apply_feature_norm(out, torch.ones(out.shape[:2], dtype=torch.bool), target).norm(dim=-1).cpu()

    batches = _batched_layers(encoder, images, batch_size, normalize, False, lambda t: t)
    return torch.cat([norms(layers) for layers in batches]).reshape(len(images), *grid)


def object_patches(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Main-object pixel masks (N, H, W) (data.render_scenes' `mask`) -> (N, h, w) bool: True where
    most (more than half) of a patch's pixels show the main object."""
    N, H, W = mask.shape
    share = patch_targets(mask.float(), patch_size).mean(-1)  # (N, h*w)
    return (share > 0.5).reshape(N, H // patch_size, W // patch_size)


def energy_auc(energy: torch.Tensor, is_object: torch.Tensor, per_image: bool = False) -> float:
    """ROC AUC of token energy (N, h, w) as a score for "this patch shows the main object"
    (is_object (N, h, w) bool): 1 when every object patch has more energy than every other patch,
    0.5 when energy tells nothing, 0 when the order is reversed. Pooled over every patch of every
    image, or (per_image) the mean over the images that have both kinds of patch, which leaves out
    differences of energy between images."""
    # roc_auc_score: ties count half, as in the Mann-Whitney U
    if not per_image:
        return float(roc_auc_score(is_object.flatten().numpy(), energy.flatten().double().numpy()))
    both = [i for i in range(len(energy)) if 0 < int(is_object[i].sum()) < is_object[i].numel()]
    if not both:
        raise ValueError("no image has both main-object and other patches")
    return float(np.mean([roc_auc_score(is_object[i].flatten().numpy(), energy[i].flatten().double().numpy())
                          for i in both]))


def normalisation_study(model: M.IJEPA, images: torch.Tensor, object_mask: torch.Tensor, masking, masks: int = 4,
                        seed: int = 0, batch_size: int = 128, normalize=None, permutations: int = 200) -> dict:
    """Every measurement of the study for one model, on images (N, C, H, W) of one resolution with
    their main-object pixel masks (N, H, W): the loss maps over `masks` masks per image (see
    `loss_maps`), the dataset-mean loss map and how checkered it is (patch by patch and in 2 x 2
    blocks), the tail of the loss per token and per image, image-level RankMe of the teacher, and
    token energy with its AUCs for the main object:

    energy_auc: the teacher's token energy before the feature norm, pooled over every patch;
    energy_auc_per_image: the same within each image, averaged;
    position_auc: the per-position mean energy, a score that knows only where objects usually are;
    energy_auc_beyond_position: energy minus that mean: what energy says about *this* image's object;
    target_energy_*: the same for the norms of the regression targets (after the feature norm), with
    their coefficient of variation. When every target has the same norm up to rounding (CV below
    1e-4: LayerNorm) their AUCs are NaN, since rounding errors would rank the patches."""
    maps = loss_maps(model, images, masking, masks, seed, batch_size, normalize)
    loss_map = dataset_loss_map(maps.loss_sum, maps.count)
    is_object = object_patches(object_mask, model.cfg.patch_size)
    out = {"maps": maps, "loss_map": loss_map,
           "checkerboard": checkerboard_score(loss_map, 1, permutations, seed),
           "checkerboard_2x2": checkerboard_score(loss_map, 2, permutations, seed),
           "tail_token": tail_ratio(maps.token_loss), "tail_image": tail_ratio(image_losses(maps.loss_sum, maps.count)),
           "rankme": image_rankme(model.teacher, normalize(images) if normalize else images)}
    for name, target in (("energy", None), ("target_energy", model.cfg.feature_norm)):
        energy = token_energy(model.teacher, images, batch_size, normalize, target=target)
        usual = energy.mean(0, keepdim=True).expand_as(energy)  # where energy usually is, not what this image shows
        cv = float(energy.std() / energy.mean())
        flat = cv < 1e-4
        out |= {name: energy, f"{name}_cv": cv,
                f"{name}_auc": math.nan if flat else energy_auc(energy, is_object),
                f"{name}_auc_per_image": math.nan if flat else energy_auc(energy, is_object, per_image=True),
                f"{name}_auc_beyond_position": math.nan if flat else energy_auc(energy - usual, is_object)}
        if name == "energy":
            out["position_auc"] = energy_auc(usual, is_object)
    return out


# -----------------------------------------------------------------------------------------------
# 8. Command line: probe a checkpoint


ENCODERS = ("teacher", "student", "random_init")  # what a checkpoint gives to probe


def _check_encoders(names) -> None:
    if not set(names) <= set(ENCODERS):
        raise ValueError(f"unknown encoders {sorted(set(names) - set(ENCODERS))}: choose from {ENCODERS}")


def checkpoint_encoders(path: str) -> tuple:
    """{teacher, student, random_init} encoders of a checkpoint, and its TrainConfig. Random init is
    the same network at its exact initial weights: train.train seeds with cfg.seed right before
    building the model, and so does this."""
    import train as T  # here, not at the top: train.py imports this module
    model, cfg = T.model_from_checkpoint(path)
    torch.manual_seed(cfg.seed)
    initial = T.build_model(cfg)
    return {"teacher": model.teacher, "student": model.student, "random_init": initial.teacher}, cfg


def probe_splits(dataset: str, resolution: int, n_train: int, n_test: int, seed: int = 0):
    """(train images, {label: labels}, test images, {label: labels}, label names) of a dataset: the
    built-in scenes (train and test splits, labels shape, count, distance), or a folder / stl10 /
    cifar10 (its train and test splits; a folder without train/ and test/ sub-folders is split 80/20
    by a seeded shuffle). Sizes cap the number of images (a fixed random subset)."""
    if dataset == "scenes":
        tr = data.SceneDataset(n_train, resolution=resolution, split="train", seed=seed)
        te = data.SceneDataset(n_test, resolution=resolution, split="test", seed=seed)
        return (tr.tensors()[0], {k: tr.tensors(k)[1] for k in data.LABELS},
                te.tensors()[0], {k: te.tensors(k)[1] for k in data.LABELS}, list(data.LABELS))

    def stack(ds):
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])
        labels = torch.tensor([int(ds[i]["label"]) for i in range(len(ds))])
        return images, labels

    has_splits = not os.path.isdir(dataset) or all(os.path.isdir(os.path.join(dataset, s)) for s in ("train", "test"))
    if has_splits:
        tr = data.get_dataset(dataset, split="train", resolution=resolution, num_images=n_train, seed=seed)
        te = data.get_dataset(dataset, split="test", resolution=resolution, num_images=n_test, seed=seed)
        (x_tr, y_tr), (x_te, y_te) = stack(tr), stack(te)
    else:
        x, y = stack(data.get_dataset(dataset, split="train", resolution=resolution))
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        cut = int(0.8 * len(x))
        x_tr, y_tr, x_te, y_te = x[order[:cut]][:n_train], y[order[:cut]][:n_train], x[order[cut:]][:n_test], y[order[cut:]][:n_test]
    if (y_tr < 0).all():
        raise ValueError(f"dataset {dataset!r} has no class labels to probe (every label is -1)")
    return x_tr, {"class": y_tr}, x_te, {"class": y_te}, ["class"]


def checkpoint_features(checkpoint: str, dataset: str = "scenes", n_train: int = 4000, n_test: int = 2000,
                        cache_dir="data/feature-cache", pixels: bool = True, progress: bool = True, labels=None,
                        encoders=ENCODERS, pool_grid: int = 1) -> dict:
    """Everything a probe of a checkpoint needs: the mean-pooled features (over a pool_grid x
    pool_grid grid of cells, `grid_pool`) of every layer of its `encoders` (teacher, student and
    random init by default; cached by checkpoint digest, dataset, sizes and pooling) and raw pixels,
    for the train and test images, with their labels."""
    _check_encoders(encoders)
    every, cfg = checkpoint_encoders(checkpoint)
    encoders = {name: every[name] for name in encoders}
    check_pool_grid((cfg.resolution // cfg.patch_size,) * 2, pool_grid)  # before any image is read
    x_tr, ys_tr, x_te, ys_te, names = probe_splits(dataset, cfg.resolution, n_train, n_test, cfg.seed)
    unknown = set(labels or ()) - set(names)
    if unknown:  # said before any feature is extracted
        raise ValueError(f"labels {sorted(unknown)} are not labels of {dataset!r}: choose from {names}")
    digest = file_digest(checkpoint)
    features = {}
    for name, encoder in encoders.items():
        made_by = digest if name != "random_init" else \
            f"init:{cfg.model}:{cfg.seed}:{cfg.patch_size}:{cfg.feature_norm}:{cfg.condition_encoders}"
        key = dict(checkpoint=made_by, encoder=name, dataset=os.path.abspath(dataset) if os.path.isdir(dataset) else dataset,
                   resolution=cfg.resolution, n_train=len(x_tr), n_test=len(x_te), seed=cfg.seed, pool_grid=pool_grid)
        # cached as tensors (a weights_only load refuses numpy arrays), probed as numpy arrays
        train_layers, test_layers = cached(cache_dir, key, lambda enc=encoder: tuple(
            [torch.from_numpy(a) for a in layer_features(enc, x, normalize=data.normalize, progress=progress,
                                                         pool_grid=pool_grid)]
            for x in (x_tr, x_te)))
        features[name] = ([a.numpy() for a in train_layers], [a.numpy() for a in test_layers])
    if pixels:
        features["pixels"] = ([x_tr.flatten(1).numpy()], [x_te.flatten(1).numpy()])
    return dict(features=features, train_labels=ys_tr, test_labels=ys_te, labels=names, config=cfg,
                train_images=x_tr, test_images=x_te)


def probe_all(features: dict, train_labels: dict, test_labels: dict, labels: list, seed: int = 0,
              progress: bool = True, concat_last: int = 4) -> dict:
    """`probe_features` for every encoder (and pixels) and every label: {label: {encoder: results}}."""
    results = {}
    for label in labels:
        y_te = np.asarray(test_labels[label])
        results[label] = {"chance": float(np.bincount(y_te).max() / len(y_te)), "n_train": len(train_labels[label]),
                          "n_test": len(y_te)}
    for name, (a, b) in tqdm(features.items(), desc="probe", disable=not progress, mininterval=5):
        prepared = prepare_encoder(a, b, seed, concat_last)  # once per encoder, for every label
        for label in labels:
            row = probe_features(a, np.asarray(train_labels[label]), b, np.asarray(test_labels[label]), seed=seed,
                                 prepared=prepared)
            if name == "pixels":
                row["best_layer"] = None
            results[label][name] = row
    return results


def run_probe(checkpoint: str, dataset: str = "scenes", n_train: int = 4000, n_test: int = 2000, labels=None,
              cache_dir="data/feature-cache", pixels: bool = True, progress: bool = True, pool_grid: int = 1) -> dict:
    """The full classification probe of a checkpoint on a dataset: {label: {encoder: results}}."""
    got = checkpoint_features(checkpoint, dataset, n_train, n_test, cache_dir, pixels, progress, labels,
                              pool_grid=pool_grid)
    labels = labels or got["labels"]
    return probe_all(got["features"], got["train_labels"], got["test_labels"], labels, got["config"].seed, progress)


def draw_confusion(results: dict, label: str, encoder: str, y_test, path, class_names=None):
    """Confusion matrix and per-class accuracy of one probe, as a figure."""
    import matplotlib.pyplot as plt
    pred = results[label][encoder]["predictions"]
    cm = confusion_matrix(y_test, pred)
    per_class = cm.diagonal() / cm.sum(1).clip(min=1)
    names = class_names or [str(k) for k in range(len(cm))]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.imshow(cm, cmap="Blues")
    for i in range(len(cm)):
        for j in range(len(cm)):
            a.text(j, i, cm[i, j], ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    a.set_xticks(range(len(cm)), names, rotation=30)
    a.set_yticks(range(len(cm)), names)
    a.set_xlabel("predicted")
    a.set_ylabel("true")
    a.set_title(f"{encoder}, {label}: confusion matrix")
    b.bar(names, per_class, color="tab:blue")
    b.set_ylim(0, 1)
    b.set_title("per-class accuracy")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


def print_probe_table(results: dict) -> None:
    for label, row in results.items():
        print(f"\n{label} (chance {row['chance']:.3f}; {row['n_train']} train / {row['n_test']} test)")
        print(f"{'encoder':<12}{'linear':>8}{'+-se':>7}{'layer':>7}{'concat-4':>10}{'k-NN':>8}{'macro-F1':>10}")
        for name in ("teacher", "student", "random_init", "pixels"):
            if name not in row:
                continue
            r = row[name]
            concat = f"{r['concat_top1']:.3f}" if "concat_top1" in r else "-"
            print(f"{name:<12}{r['best_top1']:>8.3f}{r['stderr']:>7.3f}{str(r['best_layer'] or '-'):>7}{concat:>10}"
                  f"{r['knn_top1']:>8.3f}{r['macro_f1']:>10.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="linear and k-NN probes of teacher, student, random init and pixels")
    p.add_argument("--checkpoint", help="a train.py checkpoint (default: the reference model, else the demo's)")
    p.add_argument("--dataset", default="scenes", help="scenes, stl10, cifar10, or a folder of class sub-folders")
    p.add_argument("--labels", nargs="+", help="labels to probe (scenes: shape count distance)")
    p.add_argument("--train", type=int, default=4000, help="labelled training images (at most)")
    p.add_argument("--test", type=int, default=2000, help="test images (at most)")
    p.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel probe")
    p.add_argument("--pool-grid", type=int, default=1, help="mean-pool the tokens over a K x K grid of cells "
                   "(default 1: all tokens, the paper's probe; 4 keeps where things are, e.g. for digits)")
    p.add_argument("--cache", default="data/feature-cache", help="folder for cached features ('' for none)")
    p.add_argument("--json", help="write the results here")
    d = sub.add_parser("depth", help="depth from frozen features: teacher, random init, pixels, per-position mean")
    d.add_argument("--checkpoint", help="a train.py checkpoint (default: the reference model, else the demo's)")
    d.add_argument("--dataset", default="scenes", choices=["scenes", "nyu"])
    d.add_argument("--train", type=int, default=2000)
    d.add_argument("--test", type=int, default=500)
    d.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    try:
        if args.checkpoint is None:
            import train as T  # here, not at the top: train.py imports this module
            args.checkpoint = T.default_checkpoint()
        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f"no checkpoint at {args.checkpoint!r}: train one with python train.py, or give its path")
        if args.command == "probe":
            results = run_probe(args.checkpoint, args.dataset, args.train, args.test, args.labels,
                                args.cache or None, not args.no_pixels, pool_grid=args.pool_grid)
            print_probe_table(results)
            out = {label: {k: ({m: v for m, v in r.items() if m != "predictions"} if isinstance(r, dict) else r)
                           for k, r in row.items()} for label, row in results.items()}
        else:
            out = run_depth(args.checkpoint, args.dataset, args.train, args.test)
            print_depth_table(out)
            out = {k: ({m: v for m, v in r.items() if m != "prediction"} if isinstance(r, dict) else r)
                   for k, r in out.items() if k != "test"}
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
        print(f"\nwritten: {args.json}")
    return 0


def depth_data(dataset: str, resolution: int, n_train: int, n_test: int, seed: int = 0):
    """(train images, train depths, test images, test depths, valid_fn) of scenes or NYU Depth v2."""
    if dataset == "scenes":
        tr = data.SceneDataset(n_train, resolution=resolution, split="train", seed=seed)
        te = data.SceneDataset(n_test, resolution=resolution, split="test", seed=seed)
        return tr.tensors()[0], tr.depths(), te.tensors()[0], te.depths(), lambda depth: depth < data.SKY_DEPTH
    tr, te = data.nyu_depth("train", resolution), data.nyu_depth("test", resolution)
    return (tr.images.float()[:n_train] / 255, tr.depths[:n_train], te.images.float()[:n_test] / 255, te.depths[:n_test],
            lambda depth: depth > 0)


def run_depth(checkpoint: str, dataset: str = "scenes", n_train: int = 2000, n_test: int = 500, progress=True,
              encoders=("teacher", "random_init"), baselines: bool = True) -> dict:
    """The depth probe of a checkpoint's `encoders` (its teacher and random init by default) and,
    with `baselines`, of raw pixels and the per-position mean, on the same splits."""
    _check_encoders(encoders)
    every, cfg = checkpoint_encoders(checkpoint)
    x_tr, d_tr, x_te, d_te, valid_fn = depth_data(dataset, cfg.resolution, n_train, n_test, cfg.seed)
    p = cfg.patch_size
    out = {"n_train": len(x_tr), "n_test": len(x_te)}
    for name in encoders:
        tok = lambda x: token_features(every[name], x, normalize=data.normalize, progress=progress)  # noqa: E731
        out[name] = depth_probe(tok(x_tr), d_tr, tok(x_te), d_te, p, valid_fn, seed=cfg.seed)
    if baselines:
        pix = lambda x: [M.patchify(x, p)]  # noqa: E731
        out["pixels"] = depth_probe(pix(x_tr), d_tr, pix(x_te), d_te, p, valid_fn, seed=cfg.seed)
        out["position_mean"] = position_mean_depth(d_tr, d_te, valid_fn)
    out["test"] = {"images": x_te, "depth": d_te, "valid": valid_fn(d_te)}  # for pictures
    return out


def print_depth_table(out: dict) -> None:
    print(f"\ndepth probe ({out['n_train']} train / {out['n_test']} test images; per-image scale-and-shift "
          f"alignment; valid pixels only)")
    print(f"{'model':<15}{'AbsRel':>9}{'RMSE':>9}{'d<1.25':>9}{'layer':>7}")
    for name in (*ENCODERS, "pixels", "position_mean"):
        if name not in out:
            continue
        r = out[name]
        print(f"{name:<15}{r['absrel']:>9.4f}{r['rmse']:>9.3f}{r['delta1']:>9.3f}{str(r.get('layer', '-')):>7}")


if __name__ == "__main__":
    sys.exit(main())
