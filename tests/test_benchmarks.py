"""The benchmark scripts: learning.py types recipe changes like the defaults and prints its JSON line;
train_step.py counts the FLOPs of a step and measures the machine's matmul limit; probe_agreement.py
fits scikit-learn and the torch probe to the same optimum."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import models as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import learning  # noqa: E402
import probe_agreement  # noqa: E402
import train_step  # noqa: E402


def test_recipe_changes_are_typed_like_the_defaults():
    changes = learning.recipe_changes(["batch_size=64", "lr=2e-3", "ema=0.998,1.0", "steps=1200", "packing=true"])
    assert changes == {"batch_size": 64, "lr": 2e-3, "ema": (0.998, 1.0), "steps": 1200, "packing": True}
    assert isinstance(changes["steps"], int) and isinstance(changes["lr"], float)
    with pytest.raises(SystemExit, match="FIELD one of"):
        learning.recipe_changes(["learning_rate=1e-3"])


def test_a_fixed_length_run_prints_the_json_table_and_leaves_no_files(tmp_path):
    tiny = ["num_images=64", "resolution=32", "batch_size=16", "steps=2", "log_every=1"]
    scratch = tmp_path / "tmp"  # the run's temporary folder goes here, and must be empty again at the end
    scratch.mkdir()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "learning.py"), "--set", *tiny,
                          "--probe-train", "160", "--probe-test", "80", "--labels", "shape", "--no-pixels", "--json"],
                         capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "TMPDIR": str(scratch)}).stdout
    left = [p.name for p in scratch.iterdir() if p.name.startswith("learning-")]  # (torch may add its own cache folder)
    assert left == [], f"learning.py without --out left its checkpoint behind: {left}"
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == result["total_steps"] == 2  # steps=2 replaced the default --minutes
    assert 0 < result["train_minutes"] <= result["minutes"]
    shape = result["shape"]
    for key in ("teacher", "student", "random_init"):
        assert 0.0 <= shape[key] <= 1.0
    assert shape["pixels"] is None and shape["stderr"] > 0


def test_digits_folder_splits_each_class_and_writes_the_images_it_read(tmp_path):
    import gzip
    import numpy as np
    from PIL import Image
    import digits_folder
    rng = np.random.default_rng(0)
    pixels, labels = rng.integers(0, 256, (30, 784)), np.repeat([0, 1, 2], 10)  # 3 classes x 10 images
    csv = tmp_path / "digits.csv.gz"
    with gzip.open(csv, "wt") as f:
        np.savetxt(f, np.column_stack([pixels, labels]), fmt="%d", delimiter=",")
    images, read = digits_folder.read_digits(str(csv))
    assert images.shape == (30, 28, 28) and np.array_equal(read, labels)
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


def test_learning_on_a_folder_trains_with_augmentation_and_probes_its_classes(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("test", 6)):
        for k in range(2):
            (tmp_path / split / f"c{k}").mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / split / f"c{k}" / f"{i}.png")
    tiny = ["resolution=32", "patch_size=8", "batch_size=8", "steps=2", "log_every=1", "shift=2", "flip=true"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "learning.py"), "--dataset", str(tmp_path),
                          "--set", *tiny, "--pool-grid", "2", "--json"], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert "shift 2 px, flips" in out and "tokens mean-pooled over 2 x 2 cells" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 2 and set(result) >= {"class"}
    row = result["class"]
    assert row["chance"] == 0.5 and all(0.0 <= row[k] <= 1.0 for k in ("teacher", "student", "random_init", "pixels"))


def test_pooling_probes_each_encoder_at_each_grid(tmp_path):
    import numpy as np
    from PIL import Image
    import evaluate as E
    import pooling
    import train as T
    T.train(T.TrainConfig(steps=2, num_images=32, resolution=32, batch_size=16, out=str(tmp_path / "run")), progress=False)
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 8)):
        for k in range(2):  # the class is where a bright square is: left or right half
            (tmp_path / "folder" / split / str(k)).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (32, 32), dtype=np.uint8)
                row = rng.integers(0, 24)
                pixels[row:row + 8, 16 * k + 4:16 * k + 12] = 255
                Image.fromarray(pixels).save(tmp_path / "folder" / split / str(k) / f"{i}.png")
    encoders, cfg = E.checkpoint_encoders(str(tmp_path / "run" / "checkpoint.pt"))
    r = pooling.pooled_probes(encoders, cfg, str(tmp_path / "folder"), grids=(1, 2))
    assert (r["label"], r["n_train"], r["n_test"]) == ("class", 32, 16)
    assert r["pixels"] == 1.0  # the pixels say where the square is
    for name in ("teacher", "student", "random_init"):
        assert set(r[name]) == {1, 2} and all(0.0 <= v <= 1.0 for v in r[name].values())


def test_probe_vs_steps_probes_each_kept_checkpoint_and_draws_the_curve(tmp_path):
    import shutil
    import train as T
    run = tmp_path / "run"
    cfg = dict(num_images=64, resolution=32, batch_size=16, steps=4, log_every=1, out=str(run))
    for step, stop in ((2, 2), (4, 2)):
        T.train(T.TrainConfig(**cfg, stop_after=stop, resume=step > 2), progress=False)
        shutil.copy(run / "checkpoint.pt", run / f"step-{step}.pt")
    results, figure = tmp_path / "curve.json", tmp_path / "curve.png"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "probe_vs_steps.py"), "--run", str(run), "--results",
               str(results), "--figure", str(figure), "--labels", "shape", "count", "--probe-train", "120",
               "--probe-test", "60", "--cache", str(tmp_path / "cache")]
    subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    got = json.loads(results.read_text())
    assert sorted(got["steps"], key=int) == ["2", "4"] and figure.stat().st_size > 10_000
    for label in ("shape", "count"):
        base = got["baselines"][label]
        assert {"random_init", "pixels", "chance"} <= base.keys() and 0 < base["chance"] < 1
        for step in ("2", "4"):
            assert 0 <= got["steps"][step][label]["teacher"]["top1"] <= 1 and got["steps"][step][label]["student"]["stderr"] > 0
    # a second call probes nothing again: the numbers are read back, the figure redrawn
    before = results.read_text()
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "probing step" not in out and results.read_text() == before


def test_train_step_counts_flops_and_measures_the_matmul_limit():
    # the counter on a computation whose FLOPs are known: (8 x 16) @ (16 x 4) forward = 2 * 8 * 16 * 4
    with FlopCounterMode(display=False) as counter:
        torch.randn(8, 16) @ torch.randn(16, 4)
    assert counter.get_total_flops() == 2 * 8 * 16 * 4
    # a training step: the predictor's last projection alone costs 2 * tokens * Dp * D forward
    torch.manual_seed(0)
    model = M.IJEPA(M.JEPAConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = M.mask_images(torch.rand(4, 3, 32, 32), 8, M.MultiBlockMasking(), torch.Generator().manual_seed(0))
    before = [p.clone() for p in model.parameters()]
    flops = train_step.step_flops(model, opt, batch)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # counted on a copy
    tokens = batch.hidden_patches.shape[0] * batch.hidden_patches.shape[1]
    assert flops > 3 * 2 * tokens * 64 * 128
    assert train_step.matmul_flops_per_s(256, repeats=2) > 1e8

    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--model", "micro",
                          "--size", "32", "--batch", "4", "--predictor-dim", "64", "--predictor-depth", "2",
                          "--warmup", "0", "--steps", "2", "--matmul-size", "256"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "model FLOPs per step:" in out and "GFLOP/s; the step reaches" in out


def test_both_probe_implementations_reach_the_same_optimum_for_every_C():
    import numpy as np
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
