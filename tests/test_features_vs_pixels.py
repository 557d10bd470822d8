"""studies/features_vs_pixels.py: every measurement of a run's encoder, on a tiny trained checkpoint."""

import math

import pytest

import data
import studies.features_vs_pixels as FV
import train as T


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ijepa", "mae"])
def test_measure_checkpoint_gives_every_number_of_the_comparison(tmp_path, method):
    extra = {"loss": "mse"} if method == "mae" else {}
    T.train(T.TrainConfig(steps=2, num_images=32, batch_size=16, method=method, out=str(tmp_path), **extra),
            progress=False)
    got = FV.measure_checkpoint(str(tmp_path / "checkpoint.pt"), n_train=80, n_test=40, depth_train=20, depth_test=10,
                                budgets=(1, 5), draws=2, fine_tune_steps=2, cache_dir=None, baselines=True,
                                supervised_minutes=0.01)
    for measured in (got, got["baselines"]["random_init"], got["baselines"]["pixels"]):
        assert set(measured["linear"]) == set(data.LABELS) == set(measured["few_labels"])
        assert all(0 <= r["best_top1"] <= 1 for r in measured["linear"].values())
        assert all(set(r) == {1, 5} for r in measured["few_labels"].values())
        assert set(measured["factors"]) == set(data.FACTORS)
        assert all(math.isfinite(r["r2"]) and r["r2"] <= 1 for r in measured["factors"].values())
        assert measured["depth"]["rmse"] > 0
    assert all(r["steps"] == 2 and 0 <= r["top1"] <= 1 for r in got["fine_tune"].values())
    assert got["baselines"]["position_mean"]["depth"]["rmse"] > 0
    assert all(r["steps"] >= 1 and 0 <= r["top1"] <= 1 for r in got["baselines"]["supervised"].values())
