"""benchmarks/learning.py: recipe changes are typed like the defaults; the JSON line has the promised keys."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import learning  # noqa: E402


def test_recipe_changes_are_typed_like_the_defaults():
    changes = learning.recipe_changes(["batch_size=64", "lr=2e-3", "ema=0.998,1.0", "steps=1200", "packing=true"])
    assert changes == {"batch_size": 64, "lr": 2e-3, "ema": (0.998, 1.0), "steps": 1200, "packing": True}
    assert isinstance(changes["steps"], int) and isinstance(changes["lr"], float)
    with pytest.raises(SystemExit, match="FIELD one of"):
        learning.recipe_changes(["learning_rate=1e-3"])


def test_a_fixed_length_run_prints_the_json_table():
    tiny = ["num_images=64", "resolution=32", "batch_size=16", "steps=2", "log_every=1"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "learning.py"), "--set", *tiny,
                          "--probe-train", "160", "--probe-test", "80", "--labels", "shape", "--no-pixels", "--json"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == result["total_steps"] == 2  # steps=2 replaced the default --minutes
    assert 0 < result["train_minutes"] <= result["minutes"]
    shape = result["shape"]
    for key in ("teacher", "student", "random_init"):
        assert 0.0 <= shape[key] <= 1.0
    assert shape["pixels"] is None and shape["stderr"] > 0
