"""Probing a checkpoint: `python evaluate.py probe` and `python evaluate.py depth`.

The probe protocol, used everywhere in this project: mean-pool the patch tokens of each block's
output (before the encoder's last layer) and of the final output, standardise the features, fit a
multinomial logistic regression whose regularisation is chosen on a validation split of the
*training* images, and score once on the test images. The best layer is chosen on validation too;
the test split never takes part in a choice. Beside it: a k-nearest-neighbour probe (cosine, k = 20)
and a depth probe (a linear map from each token to its patch's depths). The pieces live in
`evaluation/` (one file each: features, the logistic solver, the probes, depth, RankMe); this file
applies them to a checkpoint and is their command line.

    python evaluate.py probe --json probe.json       # the reference model on the built-in scenes
    python evaluate.py probe --checkpoint checkpoints/demo/checkpoint.pt --dataset scenes --json probe.json
    python evaluate.py probe --checkpoint CKPT --dataset path/to/folder   # class sub-folders; train/ and test/ if present
                                      # (a folder is probed by the plain mean and over 4 x 4 cells, side by side)
    python evaluate.py depth --checkpoint CKPT --dataset scenes           # or nyu (data/nyu_depth_v2_labeled.mat)

Every run probes, side by side and on the same splits: the checkpoint's teacher and student, the
same network at its initial weights (re-created from the checkpoint's seed), and raw pixels.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from sklearn.metrics import confusion_matrix
from tqdm import tqdm

import data
import models as M
import train as T
from evaluation.depth import depth_probe, position_mean_depth
from evaluation.features import check_pool_grid, cached, file_digest, layer_features, token_features
from evaluation.probes import prepare_encoder, probe_features


# -----------------------------------------------------------------------------------------------
# 1. What a checkpoint gives to probe, and the images to probe it on


ENCODERS = ("teacher", "student", "random_init")  # what a checkpoint gives to probe


def _check_encoders(names) -> None:
    if not set(names) <= set(ENCODERS):
        raise ValueError(f"unknown encoders {sorted(set(names) - set(ENCODERS))}: choose from {ENCODERS}")


def checkpoint_encoders(path: str) -> tuple:
    """{teacher, student, random_init} encoders of a checkpoint, and its TrainConfig. Random init is
    the same network at its exact initial weights (`train.initial_model`)."""
    model, cfg = T.model_from_checkpoint(path)
    return {"teacher": model.teacher, "student": model.student, "random_init": T.initial_model(cfg).teacher}, cfg


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
        items = [ds[i] for i in range(len(ds))]  # each image read once
        return torch.stack([item["image"] for item in items]), torch.tensor([int(item["label"]) for item in items])

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


# -----------------------------------------------------------------------------------------------
# 2. The classification probe of a checkpoint


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
            f"init:{cfg.model}:{cfg.seed}:{cfg.patch_size}:{cfg.feature_norm}:{cfg.condition_encoders}:{cfg.method}"
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


FOLDER_POOL_GRID = 4  # a folder is probed with the plain mean and with the tokens pooled over 4 x 4 cells


def default_pool_grids(dataset: str, grid: int) -> list:
    """The poolings `evaluate.py probe` reports when none is asked for: the plain mean (the paper's
    probe) everywhere, and for a folder of images also 4 x 4 cells where they divide the grid (a
    folder's classes may lie in where things are, which the plain mean throws away: on the digits
    folder the seed-0 student of the folder recipe probes 0.78 by the mean and 0.95 over 4 x 4 cells)."""
    return [1, FOLDER_POOL_GRID] if os.path.isdir(dataset) and grid % FOLDER_POOL_GRID == 0 else [1]


def run_probes(checkpoint: str, dataset: str, pool_grids: list, **kwargs) -> dict:
    """run_probe at each pooling: {pool grid: {label: {encoder: results}}}. Raw pixels are probed
    once (they are not pooled) and reported beside every pooling."""
    pixels = kwargs.pop("pixels", True)
    by_grid = {k: run_probe(checkpoint, dataset, pixels=pixels and i == 0, pool_grid=k, **kwargs)
               for i, k in enumerate(pool_grids)}
    if pixels:
        for results in list(by_grid.values())[1:]:
            for label, row in results.items():
                row["pixels"] = by_grid[pool_grids[0]][label]["pixels"]
    return by_grid


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


def without_predictions(results: dict) -> dict:
    """probe_all's results without the per-image predictions, for a JSON file."""
    return {label: {k: ({m: v for m, v in r.items() if m != "predictions"} if isinstance(r, dict) else r)
                    for k, r in row.items()} for label, row in results.items()}


def pooling_name(k: int) -> str:
    return "mean of all tokens" if k == 1 else f"tokens pooled over {k} x {k} cells"


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


def print_pooling_table(by_grid: dict) -> None:
    """Several poolings side by side: per label, each encoder's linear probe (best layer), concat-4
    and k-NN under each pooling."""
    grids = list(by_grid)
    for label, row in by_grid[grids[0]].items():
        se = next(r["stderr"] for r in row.values() if isinstance(r, dict))
        print(f"\n{label} (chance {row['chance']:.3f}; {row['n_train']} train / {row['n_test']} test; one standard "
              f"error about {se:.3f})")
        print(f"{'':<12}" + "".join(f"{pooling_name(k):^{26}}" for k in grids))
        print(f"{'encoder':<12}" + f"{'linear':>10}{'concat-4':>9}{'k-NN':>7}" * len(grids))
        for name in ("teacher", "student", "random_init", "pixels"):
            if name not in row:
                continue
            cells = []
            for k in grids:
                r = by_grid[k][label][name]
                concat = f"{r['concat_top1']:.3f}" if "concat_top1" in r else "-"
                cells.append(f"{r['best_top1']:>10.3f}{concat:>9}{r['knn_top1']:>7.3f}")
            print(f"{name:<12}" + "".join(cells))


# -----------------------------------------------------------------------------------------------
# 3. The depth probe of a checkpoint


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


# -----------------------------------------------------------------------------------------------
# 4. Command line


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
    p.add_argument("--pool-grid", type=int, nargs="+", help="mean-pool the tokens over a K x K grid of cells; "
                   "several K are reported side by side (default: 1, all tokens, the paper's probe; for a folder "
                   f"1 and {FOLDER_POOL_GRID}, which keeps where things are)")
    p.add_argument("--cache", default="data/feature-cache", help="folder for cached features ('' for none)")
    p.add_argument("--json", help="write the results here")
    d = sub.add_parser("depth", help="depth from frozen features: teacher, random init, pixels, per-position mean")
    d.add_argument("--checkpoint", help="a train.py checkpoint (default: the reference model, else the demo's)")
    d.add_argument("--dataset", default="scenes", choices=["scenes", "nyu"])
    d.add_argument("--train", type=int, default=2000)
    d.add_argument("--test", type=int, default=500)
    d.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    def work():
        if args.command == "probe":
            data.check_dataset(args.dataset)  # before a default checkpoint is trained or anything is read
        checkpoint = T.checkpoint_to_use(args.checkpoint)
        if args.command == "probe":
            cfg = T.checkpoint_config(T.load_checkpoint(checkpoint))
            grids = args.pool_grid or default_pool_grids(args.dataset, cfg.resolution // cfg.patch_size)
            by_grid = run_probes(checkpoint, args.dataset, grids, n_train=args.train, n_test=args.test,
                                 labels=args.labels, cache_dir=args.cache or None, pixels=not args.no_pixels)
            if len(grids) == 1:
                print_probe_table(by_grid[grids[0]])
            else:
                print_pooling_table(by_grid)
            # one pooling: {label: {encoder: ...}}; several: {"pool_grid_K": {label: ...}} for each K
            out = without_predictions(by_grid[grids[0]]) if len(grids) == 1 else \
                {f"pool_grid_{k}": without_predictions(r) for k, r in by_grid.items()}
        else:
            out = run_depth(checkpoint, args.dataset, args.train, args.test)
            print_depth_table(out)
            out = {k: ({m: v for m, v in r.items() if m != "prediction"} if isinstance(r, dict) else r)
                   for k, r in out.items() if k != "test"}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
            print(f"\nwritten: {args.json}")
        return 0

    return T.run_command("evaluate.py", work)


if __name__ == "__main__":
    sys.exit(main())
