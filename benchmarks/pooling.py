"""Why the probe of a digits-trained encoder sits below random init: how its tokens are pooled.

The project's probe mean-pools every token of a layer into one vector, as the I-JEPA paper does.
That keeps *what* is in an image and drops *where* it is. A scene's `shape` is a local property
(what the main object looks like); a handwritten digit's class lies in where its strokes are.
This script probes the encoder's final tokens pooled over a k x k grid of cells (k = 1 is the
plain mean; evaluate.grid_pool) for teacher, student and the same network at its initial
weights, beside raw pixels, with the protocol of the project's probe for one layer (logistic
regression on standardised features, C chosen on a validation part of the training images).

    python benchmarks/digits_folder.py                                   # data/digits (once)
    python train.py --dataset data/digits --out checkpoints/digits      # the demo recipe, 1,200 steps
    python benchmarks/pooling.py checkpoints/digits/checkpoint.pt --json  # k = 1, 2, 4
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import evaluate as E  # noqa: E402
import evaluation.features as EF  # noqa: E402
import evaluation.logistic as LR  # noqa: E402
import evaluation.stats as ST  # noqa: E402


def pooled_probes(encoders: dict, cfg, dataset: str, grids=(1, 2, 4), n_train: int = 4000, n_test: int = 2000,
                  pixels: bool = True, progress: bool = False) -> dict:
    """{encoder: {k: test top-1}} for the final tokens pooled over k x k cells, and {"pixels": top-1}.
    `encoders` and `cfg` are what evaluate.checkpoint_encoders returns for a checkpoint."""
    x_tr, ys_tr, x_te, ys_te, labels = E.probe_splits(dataset, cfg.resolution, n_train, n_test, cfg.seed)
    y_tr, y_te = ys_tr[labels[0]].numpy(), ys_te[labels[0]].numpy()
    out = {"label": labels[0], "n_train": len(y_tr), "n_test": len(y_te)}
    side = cfg.resolution // cfg.patch_size
    for k in grids:
        EF.check_pool_grid((side, side), k)  # before any encoding
    for name, encoder in encoders.items():
        tokens = [EF.final_tokens(encoder, x, normalize=data.normalize, progress=progress) for x in (x_tr, x_te)]
        out[name] = {}
        for k in grids:  # one encoding, pooled each way
            a, b = (EF.grid_pool(t, (side, side), k).numpy() for t in tokens)
            out[name][k] = LR.linear_probe(a, y_tr, b, y_te, seed=cfg.seed).top1
    if pixels:
        out["pixels"] = LR.linear_probe(x_tr.flatten(1).numpy(), y_tr, x_te.flatten(1).numpy(), y_te, seed=cfg.seed).top1
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="train.py checkpoints to probe")
    ap.add_argument("--dataset", default="data/digits", help="scenes, or a folder of class sub-folders")
    ap.add_argument("--grids", type=int, nargs="+", default=[1, 2, 4], help="cells per side to pool over")
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    results, probed_pixels = {}, set()
    for path in args.checkpoints:
        t0 = time.perf_counter()
        encoders, cfg = E.checkpoint_encoders(path)
        r = results[path] = pooled_probes(encoders, cfg, args.dataset, args.grids, args.train, args.test,
                                          pixels=cfg.resolution not in probed_pixels)  # pixels once per resolution
        probed_pixels.add(cfg.resolution)
        se = ST.standard_error(0.9, r["n_test"])
        print(f"\n{path}: final tokens pooled over k x k cells, probe on {r['n_train']} / {r['n_test']} images "
              f"({r['label']}; one standard error at 0.9 is {se:.3f}; {time.perf_counter() - t0:.0f} s)")
        print(f"{'encoder':<13}" + "".join(f"{f'k={k}':>8}" for k in args.grids))
        for name in E.ENCODERS:
            print(f"{name:<13}" + "".join(f"{r[name][k]:>8.3f}" for k in args.grids))
        if "pixels" in r:
            print(f"{'raw pixels':<13}{r['pixels']:>8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
