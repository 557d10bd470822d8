"""Does the demo recipe learn? Pre-train for a fixed budget, then probe.

Runs `train.py`'s defaults (the demo recipe, 1,200 steps) on the built-in scenes (or on a folder
of real images with --dataset), then fits the project's linear probe (evaluate.py: best layer
chosen on validation) on held-out images for each label, for: the teacher, the student, the same
network at its exact initial weights, and raw pixels. A falling loss proves nothing; only the
probe against these baselines says whether the encoder learned something.

    python benchmarks/learning.py                  # the demo recipe: 1,200 steps, about 17 minutes here
    python benchmarks/learning.py --minutes 3 --json   # a time budget instead of a number of steps
    python benchmarks/learning.py --set batch_size=64 lr=3e-3 --labels shape --no-pixels   # try a change
    python benchmarks/learning.py --set steps=600 --labels shape   # another length
    python benchmarks/learning.py --checkpoint checkpoints/demo/checkpoint.pt --json   # probe a trained checkpoint
    python benchmarks/learning.py --dataset data/digits --set resolution=32 patch_size=4 shift=2   # a real-image folder
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import evaluate as E  # noqa: E402
import evaluation.stats as ST  # noqa: E402
import train as T  # noqa: E402


def recipe_changes(pairs: list) -> dict:
    """["batch_size=64", "ema=0.998,1.0"] -> {"batch_size": 64, "ema": (0.998, 1.0)}, typed like the defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(T.TrainConfig)}
    changes = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in defaults or not value:
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(defaults)}")
        default = defaults[key]
        if isinstance(default, tuple):
            changes[key] = tuple(float(v) for v in value.split(","))
        elif isinstance(default, bool):
            changes[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            changes[key] = int(value)
        elif isinstance(default, float) or (default is None and value.replace(".", "", 1).isdigit()):
            changes[key] = float(value) if "." in value or isinstance(default, float) else int(value)
        else:
            changes[key] = value
    return changes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, help=f"train for this long instead of {T.DEMO_STEPS} steps (the length then "
                    "depends on the machine's speed that day)")
    ap.add_argument("--dataset", default="scenes", help="scenes (built in), or a folder of class sub-folders (train/ "
                    "and test/ if present): pre-train on its training images and probe its classes")
    ap.add_argument("--probe-train", type=int, default=4000, help="labelled training images for the probe")
    ap.add_argument("--probe-test", type=int, default=2000, help="held-out test images")
    ap.add_argument("--out", default=None, help="keep the checkpoint and log here (default: a temporary folder, "
                    "removed once the probe has read the checkpoint)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="change the recipe: train.TrainConfig fields, e.g. batch_size=64 lr=3e-3 ema=0.998,1.0")
    ap.add_argument("--labels", nargs="+", help="labels to probe (default: all; scenes: shape count distance)")
    ap.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel probe (the slowest part)")
    ap.add_argument("--pool-grid", type=int, default=1, help="probe the tokens mean-pooled over a K x K grid of cells "
                    "(default 1: all tokens; 4 keeps where things are, what a digit's class depends on)")
    ap.add_argument("--checkpoint", help="probe this checkpoint of train.py instead of training one")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--record", metavar="FILE", help="also keep this run in FILE (a JSON object of runs, by --name), "
                    "with the command that made it: benchmarks/methods.py reads such a file")
    ap.add_argument("--name", help="the run's name in --record's file (default: made from --set and --seed)")
    args = ap.parse_args()

    scratch = None  # without --out, the new checkpoint goes into a temporary folder
    if args.checkpoint:  # probe a given checkpoint, no training
        trained = T.load_checkpoint(args.checkpoint)  # read once: its config, step and length
        cfg = T.checkpoint_config(trained)
        steps, total, seconds, minutes, final_loss = trained["step"], trained["total_steps"], 0.0, 0.0, None
        checkpoint = args.checkpoint
    else:
        changes = recipe_changes(args.set)
        if {"steps", "epochs", "minutes"} & changes.keys():
            length = {}  # --set steps=N (or epochs, minutes) gives the length
        else:
            length = {"steps": T.DEMO_STEPS} if args.minutes is None else {"minutes": args.minutes}
        if not args.out:
            scratch = tempfile.TemporaryDirectory(prefix="learning-")
        out = args.out or scratch.name
        cfg = T.TrainConfig(out=out, seed=args.seed, dataset=args.dataset, **length, **changes)
        t0 = time.perf_counter()
        result = T.train(cfg, progress=not args.json)
        minutes = (time.perf_counter() - t0) / 60
        steps, total, seconds, final_loss = result.steps, result.total_steps, result.seconds, result.losses[-1]
        checkpoint = os.path.join(out, "checkpoint.pt")

    results, table = probe_table(checkpoint, args.dataset, args.probe_train, args.probe_test, args.labels,
                                 pixels=not args.no_pixels, pool_grid=args.pool_grid, progress=not args.json)
    if scratch is not None:
        scratch.cleanup()  # the features are computed: the checkpoint is no longer needed

    changed = f" (changed: {' '.join(args.set)})" if args.set else ""
    where = f"checkpoint {args.checkpoint}" if args.checkpoint else \
        f"{seconds / 60:.1f} min ({minutes:.1f} with the training scenes rendered; final loss {final_loss:.4f})"
    augment = f", shift {cfg.shift} px" * bool(cfg.shift) + ", flips" * cfg.flip
    print(f"\npre-training{changed} on {cfg.dataset}: {cfg.model}, {cfg.resolution} px, patch {cfg.patch_size}, "
          f"{cfg.masking} masking{augment}, batch {cfg.batch_size}, lr {cfg.lr}, EMA {cfg.ema[0]}->{cfg.ema[1]}: "
          f"{steps} of {total} scheduled steps, {where}")
    first = next(iter(results.values()))
    pooled = "mean of all tokens" if args.pool_grid == 1 else f"tokens mean-pooled over {args.pool_grid} x {args.pool_grid} cells"
    print(f"probe on {args.dataset}: {first['n_train']} train / {first['n_test']} test images, {pooled}, best layer on "
          f"validation; top-1 accuracy")
    print(f"{'label':<10}{'chance':>8}{'pixels':>8}{'random':>8}{'student':>9}{'teacher':>9}{'+-1 se':>8}  layers (s/t)")
    for label, r in table.items():
        print(f"{label:<10}{r['chance']:>8.3f}{'-' if r['pixels'] is None else format(r['pixels'], '.3f'):>8}{r['random_init']:>8.3f}{r['student']:>9.3f}"
              f"{r['teacher']:>9.3f}{r['stderr']:>8.3f}  {r['student_layer']}/{r['teacher_layer']}")
    label, row = next(iter(table.items()))  # shape on the scenes, the class on a folder
    best = max(row["teacher"], row["student"])
    gain = best - row["random_init"]
    in_se = f"{gain / row['stderr']:.1f} standard errors" if row["stderr"] > 0 else \
        "standard error 0: every test image right"  # an accuracy of 1 has no binomial spread
    print(f"{label}: best of teacher/student minus random init = {gain * 100:+.1f} points ({in_se})"
          + ("" if row["pixels"] is None else f"; minus pixels = {(best - row['pixels']) * 100:+.1f} points"))
    summary = summarise(table, minutes, seconds, steps, total)
    if args.json:
        print(json.dumps(summary))
    if args.record:
        name = args.name or "-".join([*args.set, f"seed{args.seed}"])
        record(args.record, name, {**summary, "method": cfg.method, "changes": recipe_changes(args.set),
                                   "seed": cfg.seed, "checkpoint": args.checkpoint or (checkpoint if args.out else None),
                                   "command": " ".join(["python", "benchmarks/learning.py", *sys.argv[1:]])})
        print(f"recorded as {name!r} in {args.record}", file=sys.stderr)  # stdout ends with the JSON


def probe_table(checkpoint: str, dataset: str = "scenes", n_train: int = 4000, n_test: int = 2000, labels=None,
                pixels: bool = True, pool_grid: int = 1, progress: bool = False) -> tuple:
    """The project's probe (evaluate.py) of a checkpoint's teacher, student, random init (re-created
    from the seed) and raw pixels -> (probe_all's results, {label: the row this script prints and
    records: chance, n_test, each encoder's test top-1, best layer and validation top-1, pixels,
    stderr})."""
    got = E.checkpoint_features(checkpoint, dataset, n_train, n_test, cache_dir=None, pixels=pixels, progress=progress,
                                labels=labels, pool_grid=pool_grid)
    results = E.probe_all(got["features"], got["train_labels"], got["test_labels"], labels or got["labels"],
                          got["config"].seed, progress=progress)
    table = {}
    for label, r in results.items():
        row = {"chance": r["chance"], "n_test": r["n_test"]}
        for name in ("teacher", "student", "random_init"):
            row[name], row[f"{name}_layer"] = r[name]["best_top1"], r[name]["best_layer"]
            row[f"{name}_val"] = r[name]["best_val_top1"]  # the best layer's validation accuracy: what a sweep may choose by
        row["pixels"] = r["pixels"]["best_top1"] if "pixels" in r else None
        row["stderr"] = ST.standard_error(max(row["teacher"], row["student"]), r["n_test"])
        table[label] = row
    return results, table


def summarise(table: dict, minutes: float, seconds: float, steps: int, total) -> dict:
    """The numbers of a run that are kept: the probe table, rounded, and the run's length and time."""
    return {**{k: {m: round(v, 4) if isinstance(v, float) else v for m, v in r.items()} for k, r in table.items()},
            "minutes": round(minutes, 4), "train_minutes": round(seconds / 60, 4), "steps": steps, "total_steps": total}


def save_json(obj, path: str) -> None:
    """Write `obj` as JSON to `path` atomically (a temporary file, then a rename): an interrupted
    run never leaves half a results file. Every benchmark that keeps results writes through this."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def record(path: str, name: str, run: dict) -> None:
    """Add (or replace) run `name` in the JSON object of runs at `path`."""
    runs = {}
    if os.path.exists(path):
        with open(path) as f:
            runs = json.load(f)
    runs[name] = run
    save_json(runs, path)


if __name__ == "__main__":
    main()
