"""Evaluating an encoder: features of every layer, the linear probe, and RankMe.

The probe protocol, used everywhere in this project: mean-pool the patch tokens of each block's
output (before the final norm) and of the final output, standardise the features, fit a
scikit-learn logistic regression whose regularisation is chosen on a validation split of the
*training* images, and score once on the test images. The best layer is chosen on validation
too; the test split never takes part in a choice.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler


@torch.no_grad()
def layer_features(encoder, images: torch.Tensor, batch_size: int = 256, normalize=None) -> list:
    """Mean-pooled tokens of every block and of the final output, for all images.

    images (N, C, H, W) -> list of depth + 1 float32 arrays (N, D): blocks 1..depth (before the
    final norm), then the final output (after it). `normalize` is applied to each image batch
    first (e.g. data.normalize)."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    per_layer = None
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        x = normalize(x) if normalize else x
        out, layers = encoder.encode(x, return_layers=True)
        pooled = [t.float().mean(1).cpu() for t in (*layers, out)]  # each (b, D)
        per_layer = [[p] for p in pooled] if per_layer is None else [acc + [p] for acc, p in zip(per_layer, pooled)]
    encoder.train(was_training)
    return [torch.cat(chunks).numpy() for chunks in per_layer]


@dataclass
class ProbeResult:
    top1: float  # accuracy on the test split
    macro_f1: float
    C: float  # chosen inverse regularisation strength
    val_top1: float  # accuracy on the validation split at that C
    predictions: np.ndarray  # test predictions, for confusion matrices
    converged: bool  # False when a fit stopped at max_iter (common for raw pixels: thousands of features)


def linear_probe(train_x, train_y, test_x, test_y, val_fraction: float = 0.2,
                 Cs=(0.01, 0.1, 1.0, 10.0), seed: int = 0, max_iter: int = 1000) -> ProbeResult:
    """Logistic regression on standardised features; C chosen on a held-out part of the training
    set, then refit on the whole training set and scored once on the test set. A fit that stops at
    `max_iter` is reported in `converged` rather than by a warning per fit."""
    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("features and labels differ in length")
    order = np.random.default_rng(seed).permutation(len(train_x))
    n_val = max(1, int(round(val_fraction * len(train_x))))
    val, fit = order[:n_val], order[n_val:]

    converged = True

    def fitted(x, y, C):
        nonlocal converged
        scaler = StandardScaler().fit(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf = LogisticRegression(C=C, max_iter=max_iter).fit(scaler.transform(x), y)
        converged &= not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        for w in caught:  # anything else is passed on
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return scaler, clf

    scores = []
    for C in Cs:
        scaler, clf = fitted(train_x[fit], train_y[fit], C)
        scores.append(float((clf.predict(scaler.transform(train_x[val])) == train_y[val]).mean()))
    best = int(np.argmax(scores))
    scaler, clf = fitted(train_x, train_y, Cs[best])
    pred = clf.predict(scaler.transform(test_x))
    return ProbeResult(top1=float((pred == test_y).mean()), macro_f1=float(f1_score(test_y, pred, average="macro")),
                       C=Cs[best], val_top1=scores[best], predictions=pred, converged=converged)


@dataclass
class LayerProbe:
    layer: int  # 1..depth for blocks, depth + 1 for the final output
    result: ProbeResult
    val_by_layer: list  # validation accuracy of every layer


def probe_best_layer(train_layers: list, train_y, test_layers: list, test_y, seed: int = 0, **kwargs) -> LayerProbe:
    """Probe every layer; the layer with the best validation accuracy is scored on test."""
    results = [linear_probe(a, train_y, b, test_y, seed=seed, **kwargs) for a, b in zip(train_layers, test_layers)]
    val = [r.val_top1 for r in results]
    best = int(np.argmax(val))
    return LayerProbe(layer=best + 1, result=results[best], val_by_layer=val)


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n test images."""
    return float(np.sqrt(accuracy * (1 - accuracy) / n))


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
