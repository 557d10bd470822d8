"""The feature-normalisation study's measurements (studies/normalisation.py) on inputs with known answers."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import data
import evaluation.features as EF
import studies.collapse as CO
import studies.normalisation as NS
import models as M


def test_known_token_losses_come_back_as_their_maps_with_counts():
    # two images on a 2 x 3 grid; image 0's patch (0, 1) is predicted by two masks (losses 1 and 3)
    token_loss = torch.tensor([1.0, 3.0, 2.0, 5.0, 7.0])
    token_image = torch.tensor([0, 0, 0, 1, 1])
    token_pos = torch.tensor([[0, 1], [0, 1], [1, 2], [0, 0], [1, 2]])
    loss_sum, count = NS.scatter_loss_maps(token_loss, token_image, token_pos, n_images=2, grid=(2, 3))
    assert loss_sum.shape == count.shape == (2, 2, 3)
    expected_count = torch.tensor([[[0, 2, 0], [0, 0, 1]], [[1, 0, 0], [0, 0, 1]]])
    assert torch.equal(count, expected_count)
    assert loss_sum[0, 0, 1] == 4.0 and loss_sum[0, 1, 2] == 2.0 and loss_sum[1, 0, 0] == 5.0 and loss_sum[1, 1, 2] == 7.0
    mean = NS.mean_loss_map(loss_sum, count)
    assert mean[0, 0, 1] == 2.0 and mean[0, 1, 2] == 2.0 and mean[1, 0, 0] == 5.0 and mean[1, 1, 2] == 7.0
    assert torch.equal(mean.isnan(), count == 0)  # NaN exactly where never predicted
    # dataset map: the mean over the images that predicted each position; NaN where none did
    dataset = NS.dataset_loss_map(loss_sum, count)
    assert dataset[0, 1] == 2.0 and dataset[0, 0] == 5.0 and dataset[1, 2] == 4.5
    assert torch.equal(dataset.isnan(), (count.sum(0) == 0))
    # per image: the mean over every token it had, the repeated patch counted twice
    assert torch.allclose(NS.image_losses(loss_sum, count), torch.tensor([6.0 / 3, 12.0 / 2], dtype=torch.float64))


def checkerboard(h, w, cell=1):
    return NS.checker_colours((h, w), cell).double() * 2 - 1  # +-1


def test_a_perfect_checkerboard_scores_far_above_its_null():
    score = NS.checkerboard_score(checkerboard(8, 8), permutations=200, seed=0)
    assert score["contrast"] == pytest.approx(2.0)  # means +1 and -1, std 1
    assert score["null_mean"] < 1.0 and score["z"] > 5 and score["p"] == pytest.approx(1 / 201)
    assert NS.checkerboard_score(checkerboard(8, 8) * 0.01 + 3.0)["z"] == pytest.approx(score["z"])  # scale-free


def test_a_constant_map_scores_zero():
    score = NS.checkerboard_score(torch.full((8, 8), 0.3))
    assert score["contrast"] == 0.0 and score["null_mean"] == 0.0 and score["z"] == 0.0


def test_smooth_maps_score_near_the_null():
    rows, cols = torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij")
    for smooth in (rows, 0.3 * rows + cols, torch.exp(-((rows - 3) ** 2 + (cols - 2) ** 2) / 8)):
        score = NS.checkerboard_score(smooth)
        assert abs(score["z"]) < 3 and score["p"] > 0.05, score


def test_the_cell_size_is_told_apart_and_nan_cells_are_left_out():
    blocks = checkerboard(8, 8, cell=2)
    assert NS.checkerboard_score(blocks, cell=2)["z"] > 5
    assert abs(NS.checkerboard_score(blocks, cell=1)["z"]) < 3
    holed = checkerboard(8, 8).clone()
    holed[0, :3] = torch.nan
    assert NS.checkerboard_score(holed)["contrast"] == pytest.approx(2.0, rel=1e-3)


def test_tail_ratio_is_the_direct_percentile_ratio():
    assert NS.tail_ratio(torch.arange(1.0, 101.0)) == pytest.approx(99.01 / 50.5)
    x = np.random.default_rng(0).exponential(size=5000)
    assert NS.tail_ratio(torch.from_numpy(x)) == pytest.approx(np.percentile(x, 99) / np.percentile(x, 50))
    assert NS.tail_ratio(torch.from_numpy(x)) == pytest.approx(np.log(100) / np.log(2), rel=0.1)  # Exp(1)'s
    assert NS.tail_ratio(torch.tensor([1.0, float("nan"), 2.0, 3.0])) == pytest.approx(2.98 / 2.0)
    with pytest.raises(ValueError):
        NS.tail_ratio(torch.ones(2, 3))


def test_energy_that_equals_the_mask_has_auc_one_and_inverted_zero():
    is_object = torch.zeros(3, 4, 4, dtype=torch.bool)
    is_object[:, 1:3, 1:3] = True
    is_object[2, 0, 0] = True
    energy = is_object.float() + 0.1 * torch.rand(3, 4, 4)
    assert NS.energy_auc(is_object.float(), is_object) == 1.0 and NS.energy_auc(energy, is_object) == 1.0
    assert NS.energy_auc(-energy, is_object) == 0.0 and NS.energy_auc(1 - is_object.float(), is_object) == 0.0
    assert NS.energy_auc(torch.ones(3, 4, 4), is_object) == 0.5
    is_object[0] = False  # per image: an image with one kind of patch only is left out
    assert NS.energy_auc(energy, is_object, per_image=True) == 1.0


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model = M.IJEPA(M.JEPAConfig(model="micro"))  # patch 8: a 4 x 4 grid at 32 px
    scenes = data.render_scenes(range(6), 32, 32)
    return model, scenes["image"], scenes["region"]


def test_loss_map_runner_counts_every_predicted_token(micro):
    model, images, _ = micro
    masking, masks, seed = M.MultiBlockMasking(), 3, 7
    maps = NS.loss_maps(model, images, masking, masks=masks, seed=seed, batch_size=4, normalize=data.normalize)
    assert maps.loss_sum.shape == maps.count.shape == (6, 4, 4)
    # replay the draws (pass by pass, image by image, one generator): the same targets, so the same counts
    g, expected = torch.Generator().manual_seed(seed), torch.zeros(6, 16, dtype=torch.long)
    for _ in range(masks):
        for i in range(6):
            expected[i, masking(4, 4, g).target] += 1
    assert torch.equal(maps.count.flatten(1), expected)
    assert int(maps.count.sum()) == len(maps.token_loss)
    mean = NS.mean_loss_map(maps.loss_sum, maps.count)
    assert torch.isfinite(mean[maps.count > 0]).all() and mean[maps.count == 0].isnan().all()
    assert (maps.token_loss > 0).all()
    # one pass over one batch: the loss the model trains on is the token-weighted mean of the map
    one = NS.loss_maps(model, images, masking, masks=1, seed=seed, batch_size=6, normalize=data.normalize)
    batch = M.mask_images(data.normalize(images), 8, masking, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        loss = model.eval()(batch).loss
    assert float(one.loss_sum.sum() / one.count.sum()) == pytest.approx(float(loss), rel=1e-5)


def test_energy_is_read_before_the_layernorm(micro):
    model, images, _ = micro
    assert model.cfg.feature_norm == "layernorm"
    energy = NS.token_energy(model.teacher, images, batch_size=4, normalize=data.normalize)
    assert energy.shape == (6, 4, 4)
    _, blocks = model.teacher.eval().encode(data.normalize(images), return_layers=True)
    assert torch.allclose(energy.flatten(1), blocks[-1].norm(dim=-1), rtol=1e-5)
    assert energy.std() / energy.mean() > 0.01  # norms differ from token to token (about 3% at initialisation)
    final = EF.final_tokens(model.teacher, images, normalize=data.normalize)  # (N, 16, D)
    targets = M.apply_feature_norm(final, torch.ones(final.shape[:2], dtype=torch.bool), "layernorm")
    norms = targets.norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, final.shape[-1] ** 0.5), rtol=1e-3)  # all sqrt(D)
    target = NS.token_energy(model.teacher, images, batch_size=4, normalize=data.normalize, target="layernorm")
    assert torch.allclose(target.flatten(1), norms, rtol=1e-5)  # the same norms, read by token_energy


def test_dyntanh_targets_keep_their_norms():
    torch.manual_seed(0)
    model = M.IJEPA(M.JEPAConfig(model="micro", patch_size=8, feature_norm="dyntanh"))
    images = torch.rand(4, 3, 32, 32)
    target = NS.token_energy(model.teacher, images, batch_size=3, normalize=data.normalize, target="dyntanh")
    final = EF.final_tokens(model.teacher, images, normalize=data.normalize)  # tanh(alpha x): the targets themselves
    assert torch.allclose(target.flatten(1), final.norm(dim=-1), rtol=1e-5)
    assert target.std() / target.mean() > 0.01  # unlike LayerNorm's, the norms differ from token to token


def test_the_study_runs_end_to_end(micro):
    model, images, regions = micro
    out = NS.normalisation_study(model, images, regions, M.MultiBlockMasking(), masks=2, batch_size=6,
                                normalize=data.normalize, permutations=50)
    assert out["loss_map"].shape == (4, 4) and out["energy"].shape == (6, 4, 4)
    for key in ("tail_token", "tail_image", "energy_auc", "energy_auc_per_image", "position_auc", "rankme",
                "energy_auc_beyond_position", "target_energy_cv"):
        assert np.isfinite(out[key]), key
    # LayerNorm targets all have one norm: ranking them would rank rounding errors, so no AUC
    assert all(np.isnan(out[f"target_energy_{k}"]) for k in ("auc", "auc_per_image", "auc_beyond_position"))
    # the summaries are of the study's own maps and energies: p99 / median of the per-token losses, and the
    # main object's AUC by scikit-learn on every patch (the position score: each position's mean energy)
    token_loss = out["maps"].token_loss.double().numpy()
    assert out["tail_token"] == pytest.approx(np.percentile(token_loss, 99) / np.percentile(token_loss, 50))
    is_object = (data.patch_regions(regions, 8) == data.MAIN_OBJECT).flatten().numpy()
    energy = out["energy"].double()
    assert out["energy_auc"] == pytest.approx(roc_auc_score(is_object, energy.flatten().numpy()))
    usual = energy.mean(0, keepdim=True).expand_as(energy)
    assert out["position_auc"] == pytest.approx(roc_auc_score(is_object, usual.flatten().numpy()))
    assert 1 <= out["rankme"] <= len(images)
    assert out["target_energy_cv"] < 1e-3  # LayerNorm targets: one norm for every token
    assert out["checkerboard"]["cell"] == 1 and out["checkerboard_2x2"]["cell"] == 2


# -----------------------------------------------------------------------------------------------
# studies/collapse.py


def test_collapse_curves_are_read_from_log_rows():
    log = [{"step": s, "loss": 1 / s, "grad_norms": {"student.0": 3.0 * s, "student.1": 4.0 * s, "predictor.0": 100.0}}
           for s in (1, 6, 11)]
    assert CO.student_grad_norm(log[0]) == pytest.approx(5.0)  # sqrt(3^2 + 4^2), the predictor left out
    steps, values = CO.series(log, CO.student_grad_norm, until=6)
    assert steps.tolist() == [1, 6] and values.tolist() == pytest.approx([5.0, 30.0])
    assert CO.series(log, "loss")[1].tolist() == pytest.approx([1, 1 / 6, 1 / 11])
    assert CO.first_row(log, lambda r: r["loss"] < 0.5)["step"] == 6 and CO.first_row(log, lambda r: False) is None


def test_largest_jump_is_the_largest_factor_either_way():
    assert CO.largest_jump([1.0, 1.0, 1.0]) == 1.0
    assert CO.largest_jump([1.0, 2.0, 1.5]) == pytest.approx(2.0)
    assert CO.largest_jump([1.0, 1.1, 0.25, 0.3]) == pytest.approx(4.4)  # the fall from 1.1 to 0.25
    with pytest.raises(ValueError, match="positive"):
        CO.largest_jump([1.0, 0.0])


def test_falls_before_reads_the_window_before_a_step():
    steps, values = np.array([0, 10, 20, 30, 40]), np.array([8.0, 4.0, 2.0, 2.0, 1.0])
    assert CO.falls_before(steps, values, at_step=30, window=20) == pytest.approx(2.0)  # 4 at step 10, 2 at 30
    assert CO.falls_before(steps, values, at_step=35, window=20) == pytest.approx(2.0)  # nearest rows at or before
    with pytest.raises(ValueError, match="no logged rows"):
        CO.falls_before(steps, values, at_step=10, window=20)


def test_equal_width_controls_keep_or_lift_the_width():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    squeezed = CO.random_projection(x, 4, seed=1)
    assert squeezed.shape == (200, 4) and np.allclose(squeezed, CO.random_projection(x, 4, seed=1))
    # a linear map: the projection of a sum is the sum of the projections
    assert np.allclose(CO.random_projection(x[:1] + x[1:2], 4), CO.random_projection(x[:1], 4) + CO.random_projection(x[1:2], 4),
                       atol=1e-5)
    train, test = CO.random_features(x[:150], x[150:], 64, seed=2)
    assert train.shape == (150, 64) and test.shape == (50, 64) and (train >= 0).all()
    # standardised with the training set's statistics: a test row equal to a training row gets its features
    assert np.allclose(CO.random_features(x[:150], x[:1], 64, seed=2)[1], train[:1], atol=1e-5)
    # a non-linear lift: XOR of two signs, which no linear probe on x separates, is separable on the features
    signs = np.sign(x[:, :2])
    xor = (signs[:, 0] * signs[:, 1] > 0).astype(int)
    from sklearn.linear_model import LogisticRegression
    lifted = CO.random_features(x, x, 512, seed=3)[0]
    assert LogisticRegression(C=10, max_iter=2000).fit(lifted, xor).score(lifted, xor) > \
        LogisticRegression(C=10, max_iter=2000).fit(x, xor).score(x, xor) + 0.15
