"""The comparison of methods (issue "Why predict features?"): what a frozen encoder's features hold,
measured the same way for I-JEPA, MAE and a SIGReg JEPA, beside raw pixels and random init.

`measure_checkpoint` gives every number of one run's encoder on the scenes:

    linear      the project's linear probe (best layer on validation), concat-4 and k-NN per label;
    few labels  the same linear probe on 1, 10 and 100 labelled scenes per class (`label_efficiency`);
    fine-tune   the last block and a head trained on the labels (`fine_tune_last_block`);
    depth       the per-token depth probe (`evaluate.run_depth`);
    factors     R^2 of a linear regression to each cause of the scene (`evaluation.factors`).

The training runs and the rules that judge them are in benchmarks/methods.py."""

import numpy as np
import torch

import data
import evaluate as E
from evaluation.factors import factor_probes
from evaluation.probes import label_efficiency
from evaluation.stats import standard_error
from studies.supervised import fine_tune_last_block, train_supervised

LABEL_BUDGETS = (1, 10, 100)  # labelled scenes per class for the few-label probe ("all" is the linear probe)
FINE_TUNE_STEPS = 300  # batches of 128: about 10 passes over 4,000 labelled scenes
SUPERVISED_MINUTES = 2.0  # the same network trained whole on each label from its initial weights (Linear_Probe's baseline)


def measure_checkpoint(checkpoint: str, encoder: str = "teacher", n_train: int = 4000, n_test: int = 2000,
                       depth_train: int = 2000, depth_test: int = 500, budgets=LABEL_BUDGETS, draws: int = 5,
                       fine_tune_steps: int = FINE_TUNE_STEPS, cache_dir="data/feature-cache", baselines: bool = False,
                       supervised_minutes: float = SUPERVISED_MINUTES, progress: bool = False) -> dict:
    """Every measurement of one encoder of a train.py checkpoint on the scenes (the splits of the
    run's seed): {"linear": {label: probe numbers}, "few_labels": {label: {n: ...}}, "fine_tune":
    {label: {"top1", "stderr", "steps"}}, "depth": {...}, "factors": {factor: {"r2", "r2_se", ...}}}.
    With `baselines`, the same (except fine-tuning) for raw pixels and the network at its initial
    weights, the depth of the per-position mean, and the network trained whole on each label for
    `supervised_minutes` (`train_supervised`), under "baselines"."""
    got = E.checkpoint_features(checkpoint, "scenes", n_train, n_test, cache_dir=cache_dir, pixels=baselines,
                                progress=progress, encoders=(encoder, "random_init") if baselines else (encoder,))
    cfg = got["config"]
    names = [encoder] + (["random_init", "pixels"] if baselines else [])
    features = {name: got["features"][name] for name in names}
    probes = E.probe_all(features, got["train_labels"], got["test_labels"], got["labels"], cfg.seed, progress=False)
    factors = {split: data.SceneDataset(n, resolution=cfg.resolution, split=split, seed=cfg.seed).factors()
               for split, n in (("train", n_train), ("test", n_test))}
    depth = E.run_depth(checkpoint, "scenes", depth_train, depth_test, progress=False,
                        encoders=(encoder, "random_init") if baselines else (encoder,), baselines=baselines)

    def no_picture(numbers):  # a depth result without its predicted depth maps
        return {k: v for k, v in numbers.items() if k != "prediction"}

    def measured(name):
        train_layers, test_layers = features[name]
        out = {"linear": {}, "few_labels": {}}
        for label in got["labels"]:
            row = probes[label][name]
            out["linear"][label] = {k: row[k] for k in ("best_top1", "stderr", "best_layer", "concat_top1", "knn_top1")
                                    if k in row}
            layer = (row["best_layer"] or 1) - 1  # pixels: one "layer"
            out["few_labels"][label] = label_efficiency(train_layers[layer], got["train_labels"][label],
                                                        test_layers[layer], got["test_labels"][label], budgets, draws,
                                                        seed=cfg.seed)
        out["factors"] = factor_probes(train_layers, factors["train"], test_layers, factors["test"],
                                       data.ANGLE_SYMMETRY, seed=cfg.seed)
        if name in depth:
            out["depth"] = no_picture(depth[name])
        return out

    def trained_on_labels(fit, **more):  # fit(train y, test y, classes) -> (top1, steps), for every label
        out = {}
        for label in got["labels"]:
            y_train, y_test = (torch.as_tensor(np.asarray(got[k][label])) for k in ("train_labels", "test_labels"))
            top1, steps = fit(y_train, y_test, data.num_classes(label))
            out[label] = {"top1": top1, "stderr": standard_error(top1, len(y_test)), "steps": steps, **more}
        return out

    x_train, x_test = got["train_images"], got["test_images"]
    result = measured(encoder)
    pretrained = E.checkpoint_encoders(checkpoint)[0][encoder]
    result["fine_tune"] = trained_on_labels(lambda y_train, y_test, classes: fine_tune_last_block(
        pretrained, x_train, y_train, x_test, y_test, classes, fine_tune_steps, seed=cfg.seed))
    if baselines:
        result["baselines"] = {name: measured(name) for name in ("random_init", "pixels")}
        result["baselines"]["position_mean"] = {"depth": no_picture(depth["position_mean"])}
        result["baselines"]["supervised"] = trained_on_labels(lambda y_train, y_test, classes: train_supervised(
            x_train, y_train, x_test, y_test, classes, supervised_minutes, cfg.patch_size, seed=cfg.seed),
            minutes=supervised_minutes)
    return result
