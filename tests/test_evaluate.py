"""The probe and its helpers on problems with known answers."""

import numpy as np
import pytest
import torch

import evaluate as E
import models as M


def blobs(n, d, classes, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * 3
    y = rng.integers(0, classes, n)
    return centres[y] + spread * rng.normal(size=(n, d)), y


def test_probe_separable_blobs_are_solved():
    x, y = blobs(600, 8, 4, 0.3, 0)
    r = E.linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert r.top1 == 1.0 and r.macro_f1 == 1.0 and r.C in (0.01, 0.1, 1.0, 10.0)


def test_probe_reports_a_fit_cut_short_without_warning(recwarn):
    x, y = blobs(300, 8, 3, 1.0, 5)
    assert E.linear_probe(x[:200], y[:200], x[200:], y[200:]).converged
    assert not E.linear_probe(x[:200], y[:200], x[200:], y[200:], max_iter=1).converged
    assert not [w for w in recwarn if "converge" in str(w.message)]


def test_probe_random_labels_stay_at_chance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(1000, 16)), rng.integers(0, 4, 1000)
    r = E.linear_probe(x[:600], y[:600], x[600:], y[600:])
    assert abs(r.top1 - 0.25) < 4 * E.standard_error(0.25, 400)


def test_probe_chooses_C_on_validation_not_test():
    x, y = blobs(400, 8, 3, 2.0, 2)
    r1 = E.linear_probe(x[:300], y[:300], x[300:], y[300:])
    r2 = E.linear_probe(x[:300], y[:300], x[300:], 1 - y[300:] % 2)  # scrambled test labels
    assert r1.C == r2.C and r1.val_top1 == r2.val_top1


def test_best_layer_is_the_informative_one():
    x, y = blobs(500, 6, 3, 0.5, 3)
    noise = np.random.default_rng(4).normal(size=x.shape)
    train, test = [noise[:350], x[:350], noise[:350]], [noise[350:], x[350:], noise[350:]]
    best = E.probe_best_layer(train, y[:350], test, y[350:])
    assert best.layer == 2 and best.result.top1 > 0.9


def test_layer_features_shapes_and_mean_pooling():
    enc = M.VisionTransformer(M.JEPAConfig().encoder_config())
    images = torch.rand(10, 3, 32, 32)
    feats = E.layer_features(enc, images, batch_size=4)
    assert len(feats) == enc.cfg.depth + 1 and all(f.shape == (10, 128) for f in feats)
    with torch.no_grad():
        out = enc.encode(images[:2])
    np.testing.assert_allclose(feats[-1][:2], out.mean(1).numpy(), atol=1e-5)


def test_rankme_bounds():
    assert E.rankme(torch.eye(16)) == pytest.approx(16, rel=1e-3)
    one_direction = torch.randn(100, 1) * torch.randn(1, 16)
    assert E.rankme(one_direction) < 1.1
