"""The factor probe: how much of each cause of a scene (`data.scene_factors`: the camera, the main
object's place and hue, the sun) a frozen encoder's features hold, as the R^2 of a linear regression
from the mean-pooled features to the factor, on held-out scenes.

A method that predicts pixels must keep whatever varies most in the pixels; a JEPA may keep what
predicts other parts of the image best. The factor table shows which causes each one's features
carry, with an R^2 of 1 for a factor read off exactly and about 0 for one not linearly there."""

import math

import numpy as np
import torch

from evaluation.depth import fit_ridge
from evaluation.logistic import validation_split
from evaluation.stats import bootstrap_se

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # ridge penalties tried on validation


def factor_targets(values: torch.Tensor, symmetry: int | None = None) -> torch.Tensor:
    """A factor's values (N,) -> regression targets (N, k): the values themselves (k = 1), or for an
    angle seen with a `symmetry`-fold symmetry, (cos(symmetry a), sin(symmetry a)) (k = 2): a point on
    the circle, so that 359 and 1 degree are neighbours."""
    v = torch.as_tensor(values, dtype=torch.float64)
    if symmetry is None:
        return v[:, None]
    return torch.stack([torch.cos(symmetry * v), torch.sin(symmetry * v)], 1)


def r_squared(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    """1 - (squared error) / (squared deviation from the mean), summed over the target's columns:
    1 for a perfect prediction, 0 for predicting the mean, below 0 for worse than that."""
    residual = ((prediction - truth) ** 2).sum()
    spread = ((truth - truth.mean(0)) ** 2).sum()
    return float(1 - residual / spread)


def factor_probe(train_layers: list, train_values, test_layers: list, test_values, symmetry: int | None = None,
                 alphas=ALPHAS, val_fraction: float = 0.2, seed: int = 0, resamples: int = 100) -> dict:
    """Ridge regression from one layer's features (lists of (n, d) and (m, d) arrays, one per layer)
    to one factor (train_values (n,), test_values (m,); rows whose value is NaN are left out). The
    layer and the penalty are chosen on a validation fifth of the training rows by R^2; the chosen
    map, refitted on every training row, is scored once on test: {"r2", "r2_se" (bootstrap over the
    test rows), "layer" (1-based), "alpha", "val_r2"}."""
    train_values, test_values = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (train_values, test_values))
    keep_train, keep_test = ~train_values.isnan(), ~test_values.isnan()
    y_train = factor_targets(train_values[keep_train], symmetry)
    y_test = factor_targets(test_values[keep_test], symmetry)
    layers = [(torch.as_tensor(np.asarray(a), dtype=torch.float64)[keep_train],
               torch.as_tensor(np.asarray(b), dtype=torch.float64)[keep_test]) for a, b in zip(train_layers, test_layers)]
    val, fit = (torch.from_numpy(rows) for rows in validation_split(len(y_train), val_fraction, seed))
    best = (-math.inf, None, None)
    for layer, (x, _) in enumerate(layers, start=1):
        scale = x[fit].std(0).clamp(min=1e-8)  # features on one scale, so one grid of penalties suits every layer
        for alpha in alphas:
            head = fit_ridge(x[fit] / scale, y_train[fit], alpha)
            score = r_squared(head(x[val] / scale), y_train[val])
            if score > best[0]:
                best = (score, layer, alpha)
    val_r2, layer, alpha = best
    x, x_test = layers[layer - 1]
    scale = x.std(0).clamp(min=1e-8)
    prediction = fit_ridge(x / scale, y_train, alpha)(x_test / scale)  # (m, k)
    pairs = torch.cat([prediction, y_test], 1)  # rows resampled together by the bootstrap
    k = y_test.shape[1]
    return {"r2": r_squared(prediction, y_test), "layer": layer, "alpha": alpha, "val_r2": val_r2,
            "r2_se": bootstrap_se(lambda rows: r_squared(rows[:, :k], rows[:, k:]), pairs, resamples, seed)}


def factor_probes(train_layers: list, train_factors: dict, test_layers: list, test_factors: dict, symmetries=None,
                  **kwargs) -> dict:
    """`factor_probe` for every factor of `train_factors` (name -> (n,) values; `test_factors` the
    same names, (m,)): {name: result}. `symmetries`: name -> k for the angles (data.ANGLE_SYMMETRY)."""
    symmetries = symmetries or {}
    return {name: factor_probe(train_layers, train_factors[name], test_layers, test_factors[name],
                               symmetries.get(name), **kwargs) for name in train_factors}
