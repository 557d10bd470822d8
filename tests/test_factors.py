"""evaluation/factors.py and data.scene_factors: the factor probe on features whose answer is known,
and the causes of hand-made scenes."""

import math

import numpy as np
import pytest
import torch

import data
import evaluation.factors as FA


def test_an_angle_becomes_a_point_on_the_circle_of_its_symmetry():
    a = torch.tensor([0.1, 1.3, 2.0], dtype=torch.float64)
    torch.testing.assert_close(FA.factor_targets(a + math.pi / 2, symmetry=4), FA.factor_targets(a, symmetry=4))
    assert FA.factor_targets(a).shape == (3, 1) and FA.factor_targets(a, symmetry=1).shape == (3, 2)


def test_r_squared_is_one_for_the_truth_zero_for_the_mean():
    y = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert FA.r_squared(y, y) == 1.0
    assert FA.r_squared(y.mean(0).expand_as(y), y) == pytest.approx(0.0, abs=1e-12)


def test_the_probe_reads_a_linear_factor_and_not_an_absent_one():
    g = torch.Generator().manual_seed(1)
    n, m, d = 600, 300, 8
    noise_layer = [torch.randn(n, d, generator=g).numpy(), torch.randn(m, d, generator=g).numpy()]
    x_train, x_test = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    w = torch.randn(d, generator=g)
    y_train = (x_train @ w + 0.05 * torch.randn(n, generator=g)).double()
    y_test = (x_test @ w + 0.05 * torch.randn(m, generator=g)).double()
    y_train[:10] = torch.nan  # a factor missing for some scenes (a hidden object): those rows are left out
    got = FA.factor_probe([noise_layer[0], x_train.numpy()], y_train, [noise_layer[1], x_test.numpy()], y_test)
    assert got["layer"] == 2 and got["r2"] > 0.99 and 0 < got["r2_se"] < 0.01  # the informative layer, chosen on validation
    absent = FA.factor_probe([noise_layer[0]], torch.randn(n, generator=g), [noise_layer[1]], torch.randn(m, generator=g))
    assert absent["r2"] < 0.05 and absent["r2_se"] > 0


def test_an_angle_is_read_only_at_the_symmetry_the_features_have():
    g = torch.Generator().manual_seed(2)
    angles = [torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi for n in (800, 400)]
    # features that see the angle only up to a quarter turn, as the checker ground shows the camera's azimuth
    layers = [torch.stack([torch.cos(4 * a), torch.sin(4 * a)], 1).numpy() for a in angles]
    four = FA.factor_probe([layers[0]], angles[0], [layers[1]], angles[1], symmetry=4)
    one = FA.factor_probe([layers[0]], angles[0], [layers[1]], angles[1], symmetry=1)
    assert four["r2"] > 0.99 and one["r2"] < 0.05


def test_scene_factors_of_a_hand_made_layout():
    layout = {"cam": torch.tensor([[0.0, 3.0, 5.0], [4.0, 2.0, 0.0]]), "aim": torch.tensor([[0.0, 1.0, 1.0], [0.0, 2.0, 0.0]]),
              "light": torch.tensor([[0.0, 1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5), 0.0]]),
              "hue": torch.tensor([[0.25, 0.9], [0.5, 0.1]])}
    masks = torch.zeros(2, 4, 8, dtype=torch.bool)
    masks[0, 1:3, 0:2] = True  # rows 1-2 of 4, columns 0-1 of 8
    f = data.scene_factors(layout, masks)
    assert f["camera_height"].tolist() == [3.0, 2.0]
    assert f["camera_distance"].tolist() == pytest.approx([math.sqrt(20), 4.0])
    assert f["camera_azimuth"].tolist() == pytest.approx([0.0, math.pi / 2])  # from the aim point: along +z, along +x
    assert f["object_row"][0] == pytest.approx(0.5) and f["object_column"][0] == pytest.approx(0.125)
    assert f["object_row"][1].isnan() and f["object_column"][1].isnan()  # no main-object pixel: hidden
    assert f["object_hue"].tolist() == pytest.approx([math.pi / 2, math.pi])  # the main object's (slot 0) hue
    assert f["sun_elevation"].tolist() == pytest.approx([math.pi / 2, math.pi / 4])
    assert f["sun_azimuth"][1] == pytest.approx(0.0)  # the sun along +x, the camera's azimuth too: 0 relative


def test_a_dataset_gives_the_factors_of_its_own_scenes():
    ds = data.SceneDataset(6, split="test", seed=1)
    f = ds.factors()
    assert set(f) == set(data.FACTORS) and all(v.shape == (6,) for v in f.values())
    layout = data.sample_scenes(np.arange(6) + data.SPLIT_OFFSET["test"], seed=1)
    assert f["camera_height"].tolist() == pytest.approx(layout["cam"][:, 1].tolist())
    visible = ds.masks().flatten(1).any(1)
    assert (f["object_row"].isnan() == ~visible).all()


def test_ridge_with_more_features_than_rows_is_the_same_map():
    from evaluation.depth import fit_ridge
    g = torch.Generator().manual_seed(3)
    x, y, z = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((20, 30), (20, 2), (5, 30)))
    wide = fit_ridge(x, y, 0.1)(z)  # the n x n system
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc = x - mean_x
    W = torch.linalg.solve(xc.T @ xc + 0.1 * 20 * torch.eye(30, dtype=x.dtype), xc.T @ (y - mean_y))  # the d x d one
    torch.testing.assert_close(wide, (z - mean_x) @ W + mean_y)
