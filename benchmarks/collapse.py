"""Collapse, made visible: the demo recipe with one safeguard changed at a time, probed along the way.

Each run is the demo recipe (`train.TrainConfig(steps=DEMO_STEPS)`, its 1,200-step schedules) with
one change (SWITCHES), trained in segments with --stop-after and --resume up to the last of
PROBE_STEPS. After each segment the encoder I-JEPA keeps, the teacher, is probed (the methods
without a teacher have one encoder; under a teacher frozen at its start it is the student that
learns, PROBED) on the built-in scenes: the project's linear probe (best layer on validation),
concat-4 and k-NN, on `shape`, `count` and `distance`, with 2,000 training and 1,000 test scenes.
Step 0 is the network at its initial weights, the same for every switch of a seed
(train.initial_model). The log rows (loss, RankMe, the targets' spread, standard deviation and
norm, per-block gradient norms) are kept with the probes, so the results file holds everything
the notebook draws, and the command that made each run.

    python benchmarks/collapse.py                                  # every switch, seeds 0 and 1 (181 minutes of runs on 2 cores)
    python benchmarks/collapse.py --switches healthy ema-0 --seeds 0   # some of them
    python benchmarks/collapse.py --list                           # the switches and what each changes

A run already in the results file is skipped, so an interrupted study continues where it stopped.
"""

import argparse
import dataclasses
import json
import os
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import evaluate as E  # noqa: E402
import train as T  # noqa: E402
from benchmarks.learning import record  # noqa: E402
from evaluation.features import layer_features  # noqa: E402

RESULTS = "benchmarks/results/collapse.json"
RUNS = "checkpoints/collapse"  # one folder per run: checkpoint.pt and log.jsonl (not committed)

# What each run changes in the demo recipe, and why it is there.
SWITCHES = {
    "healthy": ({}, "the demo recipe itself"),
    "ema-0": ({"ema": (0.0, 0.0)}, "momentum held at 0: the teacher is the student, behind a stop-gradient"),
    "ema-1": ({"ema": (1.0, 1.0)}, "momentum held at 1: the teacher stays at its random initialisation"),
    "no-stop-gradient": ({"method": "sigreg", "sigreg_weight": 0.0},
                         ("no teacher and no stop-gradient: the student's own features are the targets and "
                          "gradients flow through them")),
    "sigreg": ({"method": "sigreg"}, "no teacher and no stop-gradient, SIGReg (weight 0.05) against collapse"),
    "no-target-norm": ({"feature_norm": "none"}, "targets without normalisation"),
    "l2-loss": ({"loss": "mse"}, "plain L2 loss instead of smooth-L1"),
    "predictor-layernorm": ({"predictor_norm": "layernorm"}, "a trainable LayerNorm on the predictor's output"),
    "predictor-free": ({"predictor_norm": "free"}, "a parameter-free LayerNorm on the predictor's output"),
    "predictor-layernorm-free": ({"predictor_norm": "layernorm-free"},
                                 "a parameter-free LayerNorm after a trainable one (on an already normalised output)"),
}
# The encoder probed: the teacher (the encoder I-JEPA keeps), except where the teacher never moves
# (momentum 1): there the student is the encoder that learns, by predicting a random network's features.
PROBED = {"ema-1": "student"}
PROBE_STEPS = (25, 50, 100, 200)  # of the demo's 1,200-step schedules; warm-up ends at step 120
# Shorter runs where the collapse shows early and a step costs three times as much (one pass of the
# student over the whole image, with gradients): the runs without a teacher stop at step 100.
LAST_STEP = {"no-stop-gradient": 100, "sigreg": 100}
PROBE_TRAIN, PROBE_TEST = 2000, 1000
LOG_EVERY = 5  # a log row every 5 steps (the demo logs every 10): early spikes and the collapse phase are short
LABELS = tuple(data.LABELS)


def probe_encoder(encoder, splits: tuple, labels=LABELS) -> dict:
    """{label: {top1, stderr, layer, concat_top1, knn_top1}} of one encoder on (x_tr, ys_tr, x_te, ys_te)."""
    x_tr, ys_tr, x_te, ys_te = splits
    was_training = encoder.training
    encoder.eval()
    features = {"encoder": tuple(layer_features(encoder, x, normalize=data.normalize) for x in (x_tr, x_te))}
    encoder.train(was_training)
    results = E.probe_all(features, ys_tr, ys_te, list(labels), progress=False)
    return {label: {k: results[label]["encoder"][k] for k in ("best_top1", "stderr", "best_layer", "concat_top1", "knn_top1")}
            | {"chance": results[label]["chance"]} for label in labels}


def probe_splits(seed: int, n_train: int = PROBE_TRAIN, n_test: int = PROBE_TEST, resolution: int = 64) -> tuple:
    x_tr, ys_tr, x_te, ys_te, _ = E.probe_splits("scenes", resolution, n_train, n_test, seed)
    return x_tr, ys_tr, x_te, ys_te


def run_switch(name: str, seed: int, out: str, probe_steps=PROBE_STEPS, splits=None, base: dict | None = None,
               progress: bool = True) -> dict:
    """Train switch `name` (seed `seed`) into `out` in segments ending at each of `probe_steps`, probing
    its target encoder after each. `base`: TrainConfig fields that replace the demo recipe's (a
    smaller run for tests and the notebook's quick mode). Returns the run's record."""
    changes, _ = SWITCHES[name]
    cfg = switch_config(name, seed, out, base)
    splits = splits or probe_splits(seed, resolution=cfg.resolution)
    start = time.perf_counter()
    probed = PROBED.get(name, "teacher")
    probe_steps = [step for step in probe_steps if step <= LAST_STEP.get(name, max(probe_steps))]
    probes = {0: probe_encoder(getattr(T.initial_model(cfg), probed), splits)}
    done = 0
    for step in probe_steps:
        result = T.train(dataclasses.replace(cfg, stop_after=step - done, resume=done > 0), progress=progress)
        done = result.steps
        probes[done] = probe_encoder(getattr(result.model, probed), splits)
    log = T.read_log(out)
    return {"switch": name, "seed": seed, "probed": probed, "changes": {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()},
            "probes": probes, "log": log, "minutes": round((time.perf_counter() - start) / 60, 2)}


def switch_config(name: str, seed: int, out: str, base: dict | None = None) -> T.TrainConfig:
    """The TrainConfig of switch `name`: the demo recipe (with `base`'s fields) and the switch's change."""
    changes, _ = SWITCHES[name]
    return T.TrainConfig(**{"steps": T.DEMO_STEPS, "log_every": LOG_EVERY, **(base or {}), **changes, "seed": seed,
                            "out": out})


def run_study(switches, seeds, results: str = RESULTS, runs: str = RUNS, probe_steps=PROBE_STEPS, base=None,
              n_probe=(PROBE_TRAIN, PROBE_TEST), progress: bool = False) -> dict:
    """Every switch over every seed (seed by seed), each recorded in `results` as "<switch>-seed<k>"
    as soon as it is done; runs already there are kept, not run again. Returns the results file's
    runs (JSON: the probes' steps are strings)."""
    done = read_results(results) if os.path.exists(results) else {}
    for seed in seeds:
        splits = None
        for name in switches:
            key = f"{name}-seed{seed}"
            if key in done:
                print(f"{key}: in {results} already")
                continue
            splits = splits or probe_splits(seed, *n_probe, resolution=switch_config(name, seed, "", base).resolution)
            print(f"{key}: {SWITCHES[name][1]}", flush=True)
            run = run_switch(name, seed, os.path.join(runs, key), probe_steps, splits, base, progress)
            run["command"] = f"python benchmarks/collapse.py --switches {name} --seeds {seed}"
            record(results, key, run)
            last = run["probes"][max(run["probes"])]
            print(f"  {run['minutes']} min; shape {last['shape']['best_top1']:.3f} (step 0: "
                  f"{run['probes'][0]['shape']['best_top1']:.3f}); last loss {run['log'][-1]['loss']:.4f}, "
                  f"spread {run['log'][-1]['target_spread']:.3f}", flush=True)
    return read_results(results)


def read_results(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def checkpoint_of(key: str, results: dict, runs: str = RUNS, base=None) -> str:
    """The checkpoint of recorded run `key` ("<switch>-seed<k>"), trained again to its last probed
    step if it is not on disk (the results file is committed, the checkpoints are not; the same
    seed gives the same run)."""
    run = results[key]
    path = os.path.join(runs, key, "checkpoint.pt")
    last = max(int(step) for step in run["probes"])
    if not os.path.exists(path) or T.load_checkpoint(path)["step"] != last:
        print(f"{path}: not on disk, training it again ({last} steps)")
        T.train(dataclasses.replace(switch_config(run["switch"], run["seed"], os.path.dirname(path), base),
                                    stop_after=last), progress=False)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--switches", nargs="+", default=list(SWITCHES), choices=list(SWITCHES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--results", default=RESULTS, help="JSON file of runs (kept, and added to)")
    ap.add_argument("--runs", default=RUNS, help="folder for the runs' checkpoints and logs")
    ap.add_argument("--list", action="store_true", help="print the switches and exit")
    a = ap.parse_args(argv)
    if a.list:
        for name, (changes, what) in SWITCHES.items():
            print(f"{name:26s} {what}  {changes or ''}")
        return
    run_study(a.switches, a.seeds, a.results, a.runs)


if __name__ == "__main__":
    main()
