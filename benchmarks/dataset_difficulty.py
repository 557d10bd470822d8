"""How hard is the built-in dataset? The room that self-supervised pre-training has to show itself.

For each label (shape, count, distance), on held-out test scenes that no choice was made on:
  chance        the most frequent test class;
  pixels        the project's linear probe on raw pixels;
  random_init   the probe on mean-pooled tokens of a random-initialised `micro` encoder (best layer);
  supervised    the same `micro` encoder with a linear head on its mean-pooled output, trained on
                the labels for `--minutes` (the ceiling);
and, for shape, a probe on colour statistics alone (per-channel mean and standard deviation),
which must stay near chance: colour must not give the class away.

    python benchmarks/dataset_difficulty.py               # 10 minutes of supervised training per label
    python benchmarks/dataset_difficulty.py --json --minutes 3
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import evaluation.features as EF  # noqa: E402
import evaluation.logistic as LR  # noqa: E402
import evaluation.probes as PR  # noqa: E402
import evaluation.stats as ST  # noqa: E402
import studies.supervised as SV  # noqa: E402
import models as M  # noqa: E402


def colour_statistics(images):
    """(N, 3, H, W) -> (N, 6): per-channel mean and standard deviation."""
    return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1).numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=64, help="the demo resolution")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--train", type=int, default=12000, help="training scenes (supervised); the probes use the first --probe-train")
    ap.add_argument("--probe-train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--minutes", type=float, default=10.0, help="supervised training budget per label")
    ap.add_argument("--labels", nargs="+", default=list(data.LABELS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    train_set = data.SceneDataset(args.train, resolution=args.resolution, split="train")
    test_set = data.SceneDataset(args.test, resolution=args.resolution, split="test")
    train_x, _ = train_set.tensors()
    test_x, _ = test_set.tensors()
    render_s = time.perf_counter() - t0
    n = args.probe_train
    torch.manual_seed(0)
    random_encoder = M.VisionTransformer(M.JEPAConfig(model="micro", patch_size=args.patch).encoder_config())
    rand_train = EF.layer_features(random_encoder, train_x[:n], normalize=data.normalize)
    rand_test = EF.layer_features(random_encoder, test_x, normalize=data.normalize)
    pix_train, pix_test = train_x[:n].flatten(1).numpy(), test_x.flatten(1).numpy()

    table = {}
    for label in args.labels:
        y_train, y_test = train_set.tensors(label)[1], test_set.tensors(label)[1]
        row = {"chance": float(np.bincount(y_test.numpy()).max() / len(y_test))}
        row["pixels"] = LR.linear_probe(pix_train, y_train[:n].numpy(), pix_test, y_test.numpy()).top1
        best = PR.probe_best_layer(rand_train, y_train[:n].numpy(), rand_test, y_test.numpy())
        row["random_init"], row["random_init_layer"] = best.result.top1, best.layer
        row["supervised"], row["supervised_steps"] = SV.train_supervised(
            train_x, y_train, test_x, y_test, data.num_classes(label), args.minutes, args.patch)
        if label == "shape":
            row["color_stats"] = LR.linear_probe(colour_statistics(train_x[:n]), y_train[:n].numpy(),
                                                colour_statistics(test_x), y_test.numpy()).top1
        row["stderr"] = ST.standard_error(row["supervised"], len(y_test))
        table[label] = row

    print(f"built-in scenes at {args.resolution} px: {args.train} training scenes (probes: first {n}), "
          f"{args.test} held-out test scenes; rendered in {render_s:.1f} s")
    print(f"{'label':<10}{'chance':>8}{'colour':>8}{'pixels':>8}{'random':>8}{'supervised':>12}{'+-1 se':>8}  gap")
    for label, r in table.items():
        colour = f"{r['color_stats']:>8.3f}" if "color_stats" in r else f"{'':>8}"
        gap = r["supervised"] - max(r["pixels"], r["random_init"])
        print(f"{label:<10}{r['chance']:>8.3f}{colour}{r['pixels']:>8.3f}{r['random_init']:>8.3f}"
              f"{r['supervised']:>12.3f}{r['stderr']:>8.3f}  {gap * 100:+.1f}")
    steps = ", ".join(f"{k}: {r['supervised_steps']} steps" for k, r in table.items())
    print(f"supervised: micro encoder + linear head, {args.minutes:g} min per label ({steps}); "
          f"gap = supervised minus the better of pixels and random init, in points")
    if args.json:
        print(json.dumps({k: {m: round(v, 4) if isinstance(v, float) else v for m, v in r.items()} for k, r in table.items()}))


if __name__ == "__main__":
    main()
