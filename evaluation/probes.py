"""The classification probe of one encoder, the protocol used everywhere in this project: the linear
probe on every layer (the best layer chosen on validation), on the concatenation of the last four
blocks, and a k-nearest-neighbour probe (cosine, k = 20); and the same linear probe with few labels
(`label_efficiency`)."""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.logistic import (
    ProbeResult,
    linear_probe,
    prepare_features,
    probe_prepared,
    side_by_side,
)
from evaluation.stats import standard_error


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


def concat_blocks(layers: list, last: int = 4):
    """The features of the last `last` blocks side by side, (N, last * D), or None when the encoder
    has fewer blocks. `layers` as layer_features gives them: the blocks, then the final output."""
    blocks = len(layers) - 1
    return np.concatenate(layers[blocks - last:blocks], axis=1) if last and blocks >= last else None


def prepare_encoder(train_layers: list, test_layers: list, seed: int = 0, concat_last: int = 4) -> dict:
    """What probe_features needs of one encoder's layers, whatever the label: the layers prepared
    for the linear probe, and the concatenation of the last `concat_last` blocks."""
    out = {"layers": prepare_features(train_layers, test_layers, seed=seed)}
    if concat_blocks(train_layers, concat_last) is not None:  # concat_last=0: no concatenation probe
        blocks = len(train_layers) - 1  # the layers are the blocks, then the final output
        out["concat"] = side_by_side(out["layers"], list(range(blocks - concat_last, blocks))) or \
            prepare_features([concat_blocks(train_layers, concat_last)], [concat_blocks(test_layers, concat_last)], seed=seed)
    return out


def probe_features(train_layers: list, train_y, test_layers: list, test_y, seed: int = 0, concat_last: int = 4,
                   prepared=None) -> dict:
    """The whole classification probe of one encoder (or of raw pixels: a list of one array):
    linear probe per layer (best on validation), on the concatenation of the last `concat_last`
    blocks, and k-NN per layer (best on validation, on a validation split of the training set).
    `prepared`: prepare_encoder's output for these layers, made once for several labels."""
    prepared = prepared or prepare_encoder(train_layers, test_layers, seed, concat_last)
    best = probe_best_layer(train_layers, train_y, test_layers, test_y, prepared=prepared["layers"])
    out = {"best_top1": best.result.top1, "best_layer": best.layer, "best_val_top1": best.val_by_layer[best.layer - 1],
           "macro_f1": best.result.macro_f1,
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


def stratified_subset(labels, per_class: int, generator: torch.Generator) -> np.ndarray:
    """Indices of `per_class` rows of each class of `labels` (N,), drawn without replacement (all of
    a class's rows when it has fewer), in increasing order."""
    y = torch.as_tensor(np.asarray(labels))
    picks = []
    for c in y.unique():
        rows = (y == c).nonzero().squeeze(1)
        picks.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
    return torch.cat(picks).sort().values.numpy()


FEW = 5  # below this many labelled images per class, C is not chosen on validation but fixed at 1


def label_efficiency(train_x, train_y, test_x, test_y, per_class=(1, 10, 100), draws: int = 5, seed: int = 0) -> dict:
    """The linear probe (`linear_probe`) fitted on only `per_class` labelled training images of each
    class, for each budget, over `draws` seeded draws of those images: {n: {"top1": the mean over
    draws, "stderr": their standard deviation / sqrt(draws), "draws": each draw's top-1}}. Below FEW
    images per class a validation fifth would hold a single image or none, so C is fixed at 1 (the
    default of scikit-learn's LogisticRegression) instead of chosen on it."""
    train_x, train_y = np.asarray(train_x), np.asarray(train_y)
    out = {}
    for n in per_class:
        g = torch.Generator().manual_seed(seed)
        scores = []
        for _ in range(draws):
            rows = stratified_subset(train_y, n, g)
            Cs = (1.0,) if n < FEW else (0.01, 0.1, 1.0, 10.0)
            scores.append(linear_probe(train_x[rows], train_y[rows], test_x, test_y, Cs=Cs, seed=seed).top1)
        out[n] = {"top1": float(np.mean(scores)), "stderr": float(np.std(scores, ddof=1) / np.sqrt(draws)) if draws > 1
                  else float("nan"), "draws": scores}
    return out
