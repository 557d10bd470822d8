"""The probe and its helpers on problems with known answers."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import evaluate as E
import evaluation.depth as DP
import evaluation.features as EF
import evaluation.logistic as LR
import evaluation.probes as PR
import evaluation.rankme as RM
import evaluation.stats as ST
import models as M
import train as T


def blobs(n, d, classes, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * 3
    y = rng.integers(0, classes, n)
    return centres[y] + spread * rng.normal(size=(n, d)), y


def test_probe_separable_blobs_are_solved():
    x, y = blobs(600, 8, 4, 0.3, 0)
    r = LR.linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert r.top1 == 1.0 and r.macro_f1 == 1.0 and r.C in (0.01, 0.1, 1.0, 10.0)


def test_probe_reports_a_fit_cut_short_without_warning(recwarn):
    x, y = blobs(300, 8, 3, 1.0, 5)
    assert LR.linear_probe(x[:200], y[:200], x[200:], y[200:]).converged
    assert not LR.linear_probe(x[:200], y[:200], x[200:], y[200:], max_iter=1).converged
    assert not [w for w in recwarn if "converge" in str(w.message)]


def test_probe_random_labels_stay_at_chance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(1000, 16)), rng.integers(0, 4, 1000)
    r = LR.linear_probe(x[:600], y[:600], x[600:], y[600:])
    assert abs(r.top1 - 0.25) < 4 * ST.standard_error(0.25, 400)


def test_probe_chooses_C_on_validation_not_test():
    x, y = blobs(400, 8, 3, 2.0, 2)
    r1 = LR.linear_probe(x[:300], y[:300], x[300:], y[300:])
    r2 = LR.linear_probe(x[:300], y[:300], x[300:], 1 - y[300:] % 2)  # scrambled test labels
    assert r1.C == r2.C and r1.val_top1 == r2.val_top1


def test_best_layer_is_the_informative_one():
    x, y = blobs(500, 6, 3, 0.5, 3)
    noise = np.random.default_rng(4).normal(size=x.shape)
    train, test = [noise[:350], x[:350], noise[:350]], [noise[350:], x[350:], noise[350:]]
    best = PR.probe_best_layer(train, y[:350], test, y[350:])
    assert best.layer == 2 and best.result.top1 > 0.9


def test_layer_features_shapes_and_mean_pooling():
    enc = M.VisionTransformer(M.JEPAConfig().encoder_config())
    images = torch.rand(10, 3, 32, 32)
    feats = EF.layer_features(enc, images, batch_size=4)
    assert len(feats) == enc.cfg.depth + 1 and all(f.shape == (10, 128) for f in feats)
    with torch.no_grad():
        out = enc.encode(images[:2])
    np.testing.assert_allclose(feats[-1][:2], out.mean(1).numpy(), atol=1e-5)


def test_rankme_bounds():
    assert RM.rankme(torch.eye(16)) == pytest.approx(16, rel=1e-3)
    one_direction = torch.randn(100, 1) * torch.randn(1, 16)
    assert RM.rankme(one_direction) < 1.1


# ---------------------------------------------------------------------------------------------
# the torch probe against scikit-learn, k-NN, the cache


def test_fit_logistic_reaches_scikit_learns_optimum():
    from sklearn.linear_model import LogisticRegression
    x, y = blobs(300, 5, 3, 1.5, 7)
    for C in (0.01, 1.0):
        ref = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(x, y)
        W, b, converged = LR.fit_logistic(torch.as_tensor(x), torch.as_tensor(y), 3, C, tol=1e-6)
        assert converged
        # the softmax is unchanged by a constant added to every class: compare centred parameters
        ours = torch.cat([W.T, b[:, None]], 1).numpy()
        theirs = np.concatenate([ref.coef_, ref.intercept_[:, None]], 1)
        np.testing.assert_allclose(ours - ours.mean(0), theirs - theirs.mean(0), atol=2e-4)


def test_basis_changes_the_coordinates_not_the_fit():
    # more features than rows (as raw pixels): the rotated, truncated basis keeps the rows' span, so
    # a fit there is the fit on the standardised features themselves
    rng = np.random.default_rng(5)
    x = torch.as_tensor(rng.normal(size=(60, 150)) * rng.uniform(0.1, 3, size=150) + 2)
    y = torch.as_tensor(rng.integers(0, 3, 60))
    basis, coords = LR.Basis.from_rows(x)
    assert coords.shape == (60, 60)
    np.testing.assert_allclose(basis.rotation.T @ basis.rotation, np.eye(60), atol=1e-10)  # orthonormal
    np.testing.assert_allclose(basis.coordinates(x), coords, atol=1e-9)
    np.testing.assert_allclose(coords.T @ coords, np.diag(np.diag(coords.T @ coords)), atol=1e-8)  # uncorrelated
    standardised = (x - x.mean(0)) / x.std(0, unbiased=False)
    W, b, ok = LR.fit_logistic(coords, y, 3, 1.0, tol=1e-7)
    W_direct, b_direct, ok_direct = LR.fit_logistic(standardised, y, 3, 1.0, tol=1e-7)
    assert ok and ok_direct
    # the same logits, to what two searches stopped at a gradient of 1e-7 can agree on (logits of about 5)
    np.testing.assert_allclose(coords @ W + b, standardised @ W_direct + b_direct, rtol=1e-4, atol=1e-4)
    # a map carried to the raw features and back is the same map, and gives the same logits
    W_raw, b_raw = basis.to_features(W, b)
    np.testing.assert_allclose(x @ W_raw + b_raw, coords @ W + b, atol=1e-9)
    W_back, b_back = basis.from_features(W_raw, b_raw)
    np.testing.assert_allclose(W_back, W, atol=1e-9)
    np.testing.assert_allclose(b_back, b, atol=1e-9)


def test_float32_bases_are_orthonormal_and_the_fit_part_is_standardised_by_its_own_rows():
    rng = np.random.default_rng(8)
    low_rank = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 40))  # badly conditioned: rank 6 of 40
    for x in (low_rank + 1e-3 * rng.normal(size=(200, 40)), rng.normal(size=(30, 90))):  # d <= n, then d > n
        x = torch.as_tensor(x, dtype=torch.float32)
        basis, coords = LR.Basis.from_rows(x)
        r = basis.rotation.shape[1]
        assert basis.rotation.dtype == torch.float32 and r == min(x.shape)
        np.testing.assert_allclose(basis.rotation.T @ basis.rotation, np.eye(r), atol=1e-5)
        np.testing.assert_allclose(basis.coordinates(x), coords, atol=1e-3)
    prepared = LR.prepare_features([low_rank], [low_rank[:10]])
    fit, val = prepared.fit_rows, prepared.val_rows
    assert len(val) == 40 and sorted(torch.cat([fit, val]).tolist()) == list(range(200))
    s = prepared.sets[0]  # the fit part: its own mean and standard deviation, as scikit-learn's scaler would have
    np.testing.assert_allclose(s.fit_basis.mean, low_rank[fit.numpy()].mean(0), atol=1e-4)
    np.testing.assert_allclose(s.fit_basis.std, low_rank[fit.numpy()].std(0), rtol=1e-4)
    np.testing.assert_allclose(s.train_basis.mean, low_rank.mean(0), atol=1e-4)


def test_fit_stops_by_scikit_learns_rule_in_the_standardised_coordinates():
    x, y = blobs(300, 5, 3, 1.5, 7)
    x, y = torch.as_tensor(x), torch.as_tensor(y)

    def gradient(x, W, b, C=10.0):  # of the objective at (W, b), by autograd
        theta = torch.cat([W, b[None]]).double().requires_grad_(True)
        loss = F.cross_entropy(x @ theta[:-1] + theta[-1], y) + (theta[:-1] ** 2).sum() / (2 * C * len(x))
        loss.backward()
        return theta.grad

    W, b, ok = LR.fit_logistic(x, y, 3, 10.0, tol=1e-6)  # beyond float32: float64 finishes the search
    assert ok and W.dtype == torch.float64 and gradient(x, W, b).abs().max() <= 1e-6
    # in a basis's coordinates the rule looks at the gradient of the standardised features, of which
    # the coordinates' gradient is the turned part: an eigenbasis (d <= n), and a basis that keeps
    # only the rows' span (more features than rows)
    wide = torch.as_tensor(np.random.default_rng(4).normal(size=(40, 90)))
    labels = torch.as_tensor(np.random.default_rng(5).integers(0, 3, 40))
    for features, classes in ((x, y), (wide, labels)):
        basis, coords = LR.Basis.from_rows(features)
        W, b, ok = LR.fit_logistic(coords, classes, 3, 10.0, tol=1e-6, basis=basis)
        standardised = (features - features.mean(0)) / features.std(0, unbiased=False)
        theta = torch.cat([basis.rotate(W), b[None]]).requires_grad_(True)  # the same map on the standardised features
        loss = F.cross_entropy(standardised @ theta[:-1] + theta[-1], classes) + \
            (theta[:-1] ** 2).sum() / (2 * 10.0 * len(features))
        loss.backward()
        assert ok and theta.grad[:-1].abs().max() <= 1e-6 and theta.grad[-1].abs().max() <= 1e-6
    # a fit cut short says so
    assert not LR.fit_logistic(x, y, 3, 10.0, max_iter=2, tol=1e-6)[2]


def test_prepared_layers_probe_as_each_layer_alone():
    # prepare_features makes the split, standardisation and basis once for every label; the probe of
    # the prepared layers is the probe of each layer on its own
    x1, y = blobs(300, 5, 3, 1.5, 11)
    x2 = np.random.default_rng(12).normal(size=x1.shape) + 0.3 * x1
    layers = [x1, x2]
    together = LR.probe_prepared(LR.prepare_features([a[:200] for a in layers], [a[200:] for a in layers]), y[:200], y[200:])
    for a, r in zip(layers, together):
        alone = LR.linear_probe(a[:200], y[:200], a[200:], y[200:])
        assert (r.C, r.val_top1, r.top1) == (alone.C, alone.val_top1, alone.top1)
    with pytest.raises(ValueError, match="differ in length"):
        LR.probe_prepared(LR.prepare_features([x1[:200]], [x1[200:]]), y[:100], y[200:])


def test_sets_side_by_side_are_the_concatenated_features_without_a_basis_of_their_own():
    # concat-4 from the layers' own rotations: the block-diagonal rotation is orthonormal, so a fit
    # there is the fit on the concatenated features (same logits on the validation rows)
    # with more features side by side (2 x 50) than fit rows (80), where it is used
    x1, y = blobs(150, 50, 3, 6.0, 21)
    rng = np.random.default_rng(22)
    layers = [x1 + rng.normal(size=x1.shape) * s for s in (0.5, 1.0, 2.0)]
    train, test = [a[:100] for a in layers], [a[100:] for a in layers]
    joined = LR.side_by_side(LR.prepare_features(train, test), [1, 2])
    direct = LR.prepare_features([np.concatenate(train[1:], 1)], [np.concatenate(test[1:], 1)])
    (a, b) = joined.sets[0], direct.sets[0]
    assert a.fit.shape == (80, 100) and b.fit.shape == (80, 80) and a.test.shape == (50, 100)
    rotation = a.fit_basis.rotation
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(100), atol=1e-5)  # orthonormal
    v = torch.randn(100, 3)  # turned block by block, as by the whole block-diagonal rotation
    np.testing.assert_allclose(a.fit_basis.rotate(v), rotation @ v, atol=1e-5)
    np.testing.assert_allclose(a.fit_basis.unrotate(v), rotation.T @ v, atol=1e-5)
    np.testing.assert_allclose(a.fit_basis.coordinates(torch.as_tensor(np.concatenate(train[1:], 1), dtype=torch.float32)
                                                       [joined.fit_rows]), a.fit, atol=1e-4)
    y_fit = torch.as_tensor(y[:100])[joined.fit_rows]
    fits = [LR.fit_logistic(s.fit.double(), y_fit, 3, 1.0, tol=1e-7, basis=s.fit_basis) for s in (a, b)]
    assert all(ok for _, _, ok in fits)
    logits = [s.val.double() @ W + bias for s, (W, bias, _) in zip((a, b), fits)]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-3)
    # the probe's answers are the same too
    ours, theirs = LR.probe_prepared(joined, y[:100], y[100:])[0], LR.probe_prepared(direct, y[:100], y[100:])[0]
    assert (ours.C, ours.val_top1, ours.top1) == (theirs.C, theirs.val_top1, theirs.top1)
    # fewer features side by side than fit rows: the concatenation's own basis is cheaper
    assert LR.side_by_side(LR.prepare_features([a[:, :30] for a in train], [a[:, :30] for a in test]), [1, 2]) is None
    # a layer with more features than fit rows: no square rotation to put side by side
    wide = LR.prepare_features([rng.normal(size=(50, 60)), rng.normal(size=(50, 60))], [rng.normal(size=(10, 60))] * 2)
    assert LR.side_by_side(wide, [0, 1]) is None


def test_knn_on_separable_points_and_ties():
    x, y = blobs(400, 4, 4, 0.2, 8)
    assert PR.knn_probe(x[:300], y[:300], x[300:], y[300:]) == 1.0
    # one query, two neighbours of each class: the class of higher similarity wins the tie
    train = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    assert PR.knn_predict(train, np.array([0, 0, 1, 1]), np.array([[1.0, 0.3]]), k=4).tolist() == [0]


def test_probe_features_reports_every_part():
    x, y = blobs(500, 6, 3, 0.5, 9)
    noise = np.random.default_rng(4).normal(size=x.shape)
    layers = [noise, noise, x, noise, noise]  # 4 blocks + final output; block 3 informative
    r = PR.probe_features([a[:400] for a in layers], y[:400], [a[400:] for a in layers], y[400:])
    assert r["best_layer"] == 3 and r["best_top1"] > 0.9 and r["knn_layer"] == 3 and r["knn_top1"] > 0.9
    assert len(r["per_layer_top1"]) == 5 and r["concat_top1"] > 0.9 and r["stderr"] == ST.standard_error(r["best_top1"], 100)


def test_cache_is_keyed_by_what_made_the_features(tmp_path):
    calls = []

    def compute(value):
        calls.append(value)
        return torch.tensor([value])

    key = dict(checkpoint="aaaa", encoder="teacher", dataset="scenes")
    assert EF.cached(tmp_path, key, lambda: compute(1.0)).item() == 1.0
    assert EF.cached(tmp_path, key, lambda: compute(2.0)).item() == 1.0  # read back, not computed
    other = {**key, "checkpoint": "bbbb"}  # another checkpoint's features are never used
    assert EF.cached(tmp_path, other, lambda: compute(3.0)).item() == 3.0
    assert calls == [1.0, 3.0]
    for file in tmp_path.iterdir():  # a truncated file is computed again and replaced, never an error
        file.write_bytes(file.read_bytes()[:20])
    assert EF.cached(tmp_path, key, lambda: compute(4.0)).item() == 4.0
    assert EF.cached(tmp_path, key, lambda: compute(5.0)).item() == 4.0


# ---------------------------------------------------------------------------------------------
# the depth probe


def test_depth_patches_and_alignment_on_known_inputs():
    depth = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)
    t = M.patchify(depth[:, None], 2)  # (2, 6, 4): each token's depths, as the depth probe's targets
    assert t.shape == (2, 6, 4) and t[0, 1].tolist() == [2.0, 3.0, 8.0, 9.0]  # row 0, col 1
    true = torch.rand(3, 8, 8) + 1
    valid = torch.ones_like(true, dtype=torch.bool)
    pred = 0.5 * true - 2.0  # a scale and a shift away: alignment recovers the truth exactly
    torch.testing.assert_close(DP.align_scale_shift(pred, true, valid), true)
    m = DP.depth_metrics(pred, true, valid)
    assert m["absrel"] < 1e-5 and m["rmse"] < 1e-5 and m["delta1"] == 1.0
    m = DP.depth_metrics(torch.ones_like(true), true, valid)  # a constant: the alignment gives the mean
    assert m["delta1"] < 1.0 and m["absrel"] > 0.05


def test_depth_probe_on_features_that_encode_depth_exactly():
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(60, 8, 8, generator=g) * 10 + 1  # 60 images of 4 x 4 patches of 2 x 2 pixels
    # features: a linear image of each patch's depths relative to the training images' mean at that
    # position, which is what the head regresses
    targets = M.patchify((depth - depth[:40].mean(0))[:, None], 2)  # (60, 16, 4)
    mix = torch.randn(4, 12, generator=g)
    exact = [targets @ mix]
    noise = [torch.randn(60, 16, 12, generator=g)]
    valid = lambda d: d > 0  # noqa: E731
    good = DP.depth_probe([exact[0][:40]], depth[:40], [exact[0][40:]], depth[40:], 2, valid)
    bad = DP.depth_probe([noise[0][:40]], depth[:40], [noise[0][40:]], depth[40:], 2, valid)
    assert good["absrel"] < 1e-3 and good["delta1"] == 1.0
    assert bad["absrel"] > 0.1
    base = DP.position_mean_depth(depth[:40], depth[40:], valid)
    assert base["absrel"] > 0.1 and good["absrel"] < base["absrel"]


# ---------------------------------------------------------------------------------------------
# the command line


# tiny_checkpoint: tests/conftest.py (one 3-step micro run per session, shared with other files)


def test_probe_command_on_scenes_writes_the_promised_json(tiny_checkpoint, tmp_path):
    out = tmp_path / "probe.json"
    assert E.main(["probe", "--checkpoint", tiny_checkpoint, "--dataset", "scenes", "--labels", "shape",
                   "--train", "120", "--test", "60", "--cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())["shape"]
    for name in ("teacher", "student", "random_init", "pixels"):
        for key in ("best_top1", "best_layer", "per_layer_top1", "knn_top1"):
            assert key in result[name], (name, key)
    assert len(result["teacher"]["per_layer_top1"]) == 5 and result["pixels"]["best_layer"] is None
    assert len(list((tmp_path / "cache").iterdir())) == 3  # teacher, student, random init
    # a second probe reads the features back from the cache (a weights_only load) and measures the same
    again = tmp_path / "again.json"
    assert E.main(["probe", "--checkpoint", tiny_checkpoint, "--dataset", "scenes", "--labels", "shape",
                   "--train", "120", "--test", "60", "--cache", str(tmp_path / "cache"), "--json", str(again)]) == 0
    assert json.loads(again.read_text()) == json.loads(out.read_text())
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_probe_command_defaults_to_the_reference_model(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(T, "REFERENCE_CHECKPOINT", tiny_checkpoint)
    out = tmp_path / "probe.json"
    assert E.main(["probe", "--labels", "shape", "--train", "120", "--test", "60", "--cache", "", "--no-pixels",
                   "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["shape"]) >= {"teacher", "student", "random_init"}
    monkeypatch.setattr(T, "REFERENCE_CHECKPOINT", str(tmp_path / "absent.pt"))
    monkeypatch.setattr(T, "DEMO_CHECKPOINT", str(tmp_path / "absent-too.pt"))
    monkeypatch.setattr(T, "checkpoint_or_train", lambda path, cfg: path)  # (no demo training inside a test)
    assert E.main(["depth"]) == 1
    assert "no checkpoint at" in capsys.readouterr().err


def test_grid_pool_averages_each_cell_of_the_patch_grid():
    h, w, d = 4, 6, 2
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    tokens = torch.stack([rows, cols], -1).float().view(1, h * w, d)     # each token holds its (row, col)
    assert torch.equal(EF.grid_pool(tokens, (h, w), 1), torch.tensor([[1.5, 2.5]]))  # the plain mean
    cells = EF.grid_pool(tokens, (h, w), 2).view(2, 2, d)                 # cells of 2 x 3 tokens
    assert torch.equal(cells[..., 0], torch.tensor([[0.5, 0.5], [2.5, 2.5]]))  # mean row of each cell
    assert torch.equal(cells[..., 1], torch.tensor([[1.0, 4.0], [1.0, 4.0]]))  # mean column
    for bad in (0, 3):
        with pytest.raises(ValueError, match=f"pool grid {bad}: must divide the 4 x 6 patch grid"):
            EF.grid_pool(tokens, (h, w), bad)
    enc = M.VisionTransformer(M.JEPAConfig().encoder_config())
    images = torch.rand(3, 3, 32, 32)
    feats = EF.layer_features(enc, images, pool_grid=2)
    with torch.no_grad():
        out = enc.encode(images).view(3, 2, 2, 2, 2, -1)                  # (B, cell row, row, cell col, col, D)
    assert feats[-1].shape == (3, 4 * out.shape[-1])
    np.testing.assert_allclose(feats[-1], out.mean((2, 4)).flatten(1).numpy(), atol=1e-5)
    pooled_final = EF.grid_pool(EF.final_tokens(enc, images), (4, 4), 2)      # benchmarks/pooling.py's path
    np.testing.assert_allclose(pooled_final.numpy(), feats[-1], atol=1e-5)


def test_probe_command_on_a_folder(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng(0)
    for k, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        (tmp_path / "images" / f"class{k}").mkdir(parents=True)
        for i in range(30):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / f"class{k}" / f"{i}.png")
    out = tmp_path / "probe.json"
    # a folder is probed by the plain mean and over 4 x 4 cells (the checkpoint's whole 4 x 4 grid), side by side
    assert E.main(["probe", "--checkpoint", tiny_checkpoint, "--dataset", str(tmp_path / "images"), "--cache", "",
                   "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mean of all tokens" in printed and "tokens pooled over 4 x 4 cells" in printed
    both = json.loads(out.read_text())
    assert set(both) == {"pool_grid_1", "pool_grid_4"}
    plain, cells = both["pool_grid_1"]["class"], both["pool_grid_4"]["class"]
    assert plain["n_test"] == 12 and plain["pixels"]["best_top1"] == 1.0  # colour separates the classes
    assert cells["pixels"] == plain["pixels"]  # pixels are probed once and shown beside each pooling
    assert len(cells["teacher"]["per_layer_top1"]) == len(plain["teacher"]["per_layer_top1"]) == 5
    assert E.main(["probe", "--checkpoint", tiny_checkpoint, "--dataset", str(tmp_path / "images"), "--cache", "",
                   "--pool-grid", "2", "--no-pixels", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["class"]["teacher"]["best_top1"] >= 0.9   # pooled per cell, colour still shows


def test_probe_command_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    assert E.main(["probe", "--checkpoint", str(tmp_path / "missing.pt")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    assert E.main(["probe", "--checkpoint", tiny_checkpoint, "--labels", "colour", "--cache", ""]) == 1
    assert "are not labels of 'scenes'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert E.main(["probe", "--checkpoint", tiny_checkpoint, "--dataset", str(tmp_path / "empty"), "--cache", ""]) == 1
    assert "no images" in capsys.readouterr().err
    assert E.main(["probe", "--checkpoint", tiny_checkpoint, "--pool-grid", "3", "--cache", ""]) == 1
    assert "pool grid 3: must divide the 4 x 4 patch grid" in capsys.readouterr().err


def position_mean_metrics(train_depth, test_depth):
    """The per-position-mean baseline's AbsRel, RMSE and delta < 1.25, computed here independently in
    numpy: each test image gets the training images' mean depth at each pixel, fitted to the image's
    non-sky pixels by a least-squares scale and shift (np.polyfit), then scored on those pixels."""
    prior = train_depth.astype(np.float64).mean(0)
    rows = []
    for true in test_depth.astype(np.float64):
        valid = true < data.SKY_DEPTH
        assert valid.any()  # every test scene shows ground
        scale, shift = np.polyfit(prior[valid], true[valid], 1)
        pred, true = np.maximum(scale * prior[valid] + shift, 1e-3), true[valid]
        rows.append((np.mean(np.abs(pred - true) / true), np.sqrt(np.mean((pred - true) ** 2)),
                     np.mean(np.maximum(pred / true, true / pred) < 1.25)))
    return dict(zip(("absrel", "rmse", "delta1"), np.mean(rows, axis=0)))


def test_depth_command_measures_every_model_and_the_position_mean_baseline(tiny_checkpoint, tmp_path):
    out = tmp_path / "depth.json"
    assert E.main(["depth", "--checkpoint", tiny_checkpoint, "--train", "80", "--test", "20", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"n_train", "n_test", "teacher", "random_init", "pixels", "position_mean"}
    assert (result["n_train"], result["n_test"]) == (80, 20)
    # the baseline, on the run's scenes (seed 0), against the same numbers computed independently
    train_depth = data.SceneDataset(80, resolution=32, split="train", seed=0).depths().numpy()
    test_depth = data.SceneDataset(20, resolution=32, split="test", seed=0).depths().numpy()
    expected = position_mean_metrics(train_depth, test_depth)
    for metric in ("absrel", "rmse"):
        assert result["position_mean"][metric] == pytest.approx(expected[metric], rel=1e-4)
    assert result["position_mean"]["delta1"] == pytest.approx(expected["delta1"], abs=1e-3)
    # each probe: a layer of its encoder (micro: 4 blocks and the final norm; pixels: one), an alpha of the grid
    for name, layers in (("teacher", 5), ("random_init", 5), ("pixels", 1)):
        r = result[name]
        assert 1 <= r["layer"] <= layers and r["alpha"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0) and r["val_mse"] > 0
        assert r["absrel"] != result["position_mean"]["absrel"]  # the map adds something to the prior it starts from


def test_the_encoders_asked_for_are_the_ones_measured(tiny_checkpoint, tmp_path):
    got = E.checkpoint_features(tiny_checkpoint, "scenes", 40, 20, cache_dir=None, pixels=False, progress=False,
                                encoders=("teacher",))
    assert set(got["features"]) == {"teacher"}
    depth = E.run_depth(tiny_checkpoint, "scenes", 40, 10, progress=False, encoders=("student",), baselines=False)
    assert {"student"} == set(depth) - {"n_train", "n_test", "test"}
    for call in (lambda: E.checkpoint_features(tiny_checkpoint, encoders=("teachr",)),
                 lambda: E.run_depth(tiny_checkpoint, encoders=("teachr",))):
        with pytest.raises(ValueError, match="unknown encoders \\['teachr'\\]: choose from"):
            call()


def test_the_probe_command_checks_the_dataset_before_any_checkpoint(tmp_path, capsys):
    # a missing dataset folder is named, one line, before the (also missing) checkpoint is looked for
    code = E.main(["probe", "--dataset", str(tmp_path / "no-such-folder"), "--checkpoint", str(tmp_path / "none.pt")])
    err = capsys.readouterr().err
    assert code == 1 and "no-such-folder" in err and "not a known dataset" in err and "none.pt" not in err
    assert err.count("\n") == 1 and err.startswith("evaluate.py: error:")


def test_bootstrap_se_of_a_mean_is_the_formula():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(400, generator=g, dtype=torch.float64)
    expected = float(values.std()) / len(values) ** 0.5  # about 0.05
    assert ST.bootstrap_se(lambda v: float(v.mean()), values, resamples=400) == pytest.approx(expected, rel=0.15)
    assert ST.bootstrap_se(lambda v: float(v.mean()), torch.ones(50), resamples=20) == 0.0  # no spread, no error
    with pytest.raises(ValueError, match="at least 2 rows"):
        ST.bootstrap_se(lambda v: 0.0, torch.ones(1))


def test_compare_counts_a_difference_beyond_two_standard_errors_of_the_difference():
    # se of the difference: hypot(0.03, 0.04) = 0.05, so 0.11 is 2.2 s.e. and 0.09 is 1.8
    assert ST.compare(0.61, 0.03, 0.50, 0.04).z == pytest.approx(2.2)
    assert ST.compare(0.61, 0.03, 0.50, 0.04).verdict == "better"
    assert ST.compare(0.59, 0.03, 0.50, 0.04).verdict == "no difference"
    assert ST.compare(0.39, 0.03, 0.50, 0.04).verdict == "worse"
    # lower is better (an error): the smaller one wins
    assert ST.compare(0.39, 0.03, 0.50, 0.04, higher_is_better=False).verdict == "better"
    # a floor on the standard error: two perfect scores' binomial se is 0
    assert ST.compare(1.0, 0.0, 0.99, 0.0).z == float("inf")
    assert ST.compare(1.0, 0.0, 0.99, 0.0, min_se=0.01).verdict == "no difference"
    assert ST.compare(0.5, 0.0, 0.5, 0.0).verdict == "no difference"
    d = ST.compare(0.669, ST.standard_error(0.669, 2000), 0.465, ST.standard_error(0.465, 2000))
    assert d.sentence("teacher", "pixels", points=True).startswith("teacher 0.669 vs pixels 0.465: +20.4 points (+13.3")
    assert d.sentence("teacher", "pixels").endswith("teacher better")
    with pytest.raises(ValueError, match="single measurement"):
        ST.compare(0.5, float("nan"), 0.4, 0.01)
    with pytest.raises(ValueError, match="standard errors are never negative"):
        ST.compare(0.5, -0.01, 0.4, 0.01)


def test_attention_weights_are_the_softmax_each_block_applies():
    import evaluation.attention as AT

    torch.manual_seed(0)
    encoder = M.VisionTransformer(M.ViTConfig(patch_size=4, dim=32, depth=3, heads=4)).eval()
    images = torch.rand(2, 3, 12, 16)  # a 3 x 4 patch grid
    outputs = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: outputs.append((args[0], out))) for b in encoder.blocks]
    weights = AT.attention_weights(encoder, images)
    for h in hooks:
        h.remove()
    assert weights.shape == (3, 2, 4, 12, 12)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 2, 4, 12), atol=1e-5) and (weights >= 0).all()
    # weights times the values, through the output projection, is what each block's attention returned
    for block, w, (x, out) in zip(encoder.blocks, weights, outputs):
        v = block.attn.qkv(x).reshape(2, 12, 3, 4, 8)[:, :, 2].transpose(1, 2)  # (B, H, N, D/H)
        mixed = (w @ v).transpose(1, 2).reshape(2, 12, 32)
        assert torch.allclose(block.attn.proj(mixed), out, atol=1e-5)


def test_attention_distance_on_hand_made_weights():
    import evaluation.attention as AT

    n = 2 * 4  # a 2 x 4 grid
    one_hot = torch.zeros(n, n)
    one_hot[0, 3] = 1.0  # (0, 0) looks only at (0, 3): 3 patches away
    one_hot[5, 5] = 1.0  # (1, 1) looks only at itself
    d = AT.attention_distance(one_hot, (2, 4))
    assert d[0].item() == pytest.approx(3.0) and d[5].item() == pytest.approx(0.0)
    uniform = torch.full((4, 4), 0.25)  # a 2 x 2 grid; from a corner: distances 0, 1, 1, sqrt(2)
    assert AT.attention_distance(uniform, (2, 2))[0].item() == pytest.approx((2 + 2 ** 0.5) / 4)


def test_lidar_counts_the_directions_in_which_images_differ_more_than_their_views():
    g = torch.Generator().manual_seed(0)
    N, q, D, k = 400, 4, 16, 5
    # class means spread equally along k axes, views scattered isotropically around them: LDA sees k directions
    means = torch.zeros(N, D)
    means[:, :k] = 3 * torch.randn(N, k, generator=g)
    views = means[:, None] + 0.5 * torch.randn(N, q, D, generator=g)
    value = RM.lidar(views)
    assert value == pytest.approx(k, rel=0.1)
    # any invertible linear map of the features leaves it unchanged (RankMe moves)
    A = torch.randn(D, D, generator=g) + 3 * torch.eye(D)
    mapped = views @ A.T
    assert RM.lidar(mapped, delta=1e-8) == pytest.approx(RM.lidar(views, delta=1e-8), rel=1e-3)
    assert abs(RM.rankme(mapped.flatten(0, 1)) - RM.rankme(views.flatten(0, 1))) > 0.5
    # views that carry nothing of their image: no direction stands out more than by chance (about D, not k)
    noise = torch.randn(N, q, D, generator=g)
    assert RM.lidar(noise) > 0.8 * D
    with pytest.raises(ValueError, match="at least 2 images and 2 views"):
        RM.lidar(torch.zeros(10, 1, 4))


def test_masked_views_are_the_student_on_each_context_as_in_training():
    import studies.ec_ijepa as EC
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)
    masking = M.make_masking("multiblock")
    model = M.IJEPA(M.JEPAConfig(model="micro"))
    views = RM.masked_view_embeddings(model, images, masking, views=2, seed=1)
    assert views.shape == (3, 2, model.student.cfg.dim) and model.training  # the caller's mode is given back
    # the first view of image 1, directly: the same draws, then that image's context alone through the student
    g = torch.Generator().manual_seed(1)
    batch = M.mask_images(images, 8, masking, g)
    keep = batch.context_sample[1] >= 0
    with torch.no_grad():
        alone = model.student.eval()(batch.context_patches[1:2, keep], batch.context_pos[1:2, keep],
                                     torch.zeros(1, int(keep.sum()), dtype=torch.long))
    torch.testing.assert_close(views[1, 0], alone[0].mean(0), atol=1e-5, rtol=1e-4)
    # an encoder-conditioned student is given the target positions, as in training: its views are
    # encode_context's tokens, and differ from the same student run without them
    conditioned = EC.ConditionedIJEPA(M.JEPAConfig(model="micro")).eval()
    views = RM.masked_view_embeddings(conditioned, images, masking, views=1, seed=1)
    with torch.no_grad():
        tokens = conditioned.encode_context(batch)[1:2, keep]
        plain = conditioned.student(batch.context_patches[1:2, keep], batch.context_pos[1:2, keep],
                                    torch.zeros(1, int(keep.sum()), dtype=torch.long))
    torch.testing.assert_close(views[1, 0], tokens[0].mean(0), atol=1e-5, rtol=1e-4)
    assert (views[1, 0] - plain[0].mean(0)).abs().max() > 1e-3

def test_a_stratified_subset_takes_so_many_of_each_class():
    y = np.array([0] * 10 + [1] * 3 + [2] * 7)
    rows = PR.stratified_subset(y, 4, torch.Generator().manual_seed(0))
    assert np.bincount(y[rows]).tolist() == [4, 3, 4] and len(set(rows.tolist())) == len(rows)  # all 3 of class 1


def test_label_efficiency_grows_with_labels_on_clusters_and_stays_at_chance_on_noise():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 16, generator=g)

    def clusters(n):  # four classes, each a Gaussian cloud around its centre, overlapping a little
        y = torch.arange(n) % 4
        return (centres[y] + 2.5 * torch.randn(n, 16, generator=g)).numpy(), y.numpy()
    (x, y), (x_test, y_test) = clusters(800), clusters(400)
    got = PR.label_efficiency(x, y, x_test, y_test, per_class=(1, 10, 100), draws=4)
    assert got[1]["top1"] < got[100]["top1"] and got[100]["top1"] > 0.85 and len(got[10]["draws"]) == 4
    assert all(r["stderr"] >= 0 for r in got.values())
    noise = PR.label_efficiency(torch.randn(800, 16, generator=g).numpy(), y, torch.randn(400, 16, generator=g).numpy(),
                                y_test, per_class=(100,), draws=2)  # features that say nothing of the class
    assert abs(noise[100]["top1"] - 0.25) < 0.08
