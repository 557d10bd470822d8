"""MAE on I-JEPA's backbone (studies/mae.py): its masking, targets, encoder input and loss against
direct computations, and a teacher slot that is always the encoder."""

import pytest
import torch
import torch.nn.functional as F

import models as M
import studies.mae as MAE
import train as T


def test_random_masking_hides_the_ratio_and_every_hidden_patch_is_a_target():
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros(64)
    for _ in range(200):
        mask = MAE.RandomMasking(0.75)(8, 8, g)
        assert len(mask.target) == 48 and len(mask.context) == 16
        assert set(mask.context.tolist()).isdisjoint(mask.target.tolist())
        assert sorted(mask.context.tolist() + mask.target.tolist()) == list(range(64))
        seen[mask.context] += 1
    assert seen.min() > 0  # every patch is sometimes visible: the masks are not one fixed pattern
    assert len(MAE.RandomMasking(0.99)(2, 2, g).context) == 1  # always something to see
    with pytest.raises(ValueError, match="--mask-ratio must be between 0 and 1"):
        MAE.RandomMasking(1.0)


def batch_of(images, ratio=0.75, seed=0):
    return M.mask_images(images, 8, MAE.RandomMasking(ratio), torch.Generator().manual_seed(seed))


def test_mae_regresses_each_hidden_patchs_own_normalised_pixels_with_mse():
    torch.manual_seed(0)
    model = MAE.MAE(M.JEPAConfig(loss="mse"))
    images = torch.rand(3, 3, 32, 32)
    batch = batch_of(images)
    out = model(batch)
    # the targets, directly: every hidden patch minus its mean, over its population standard deviation
    p = batch.hidden_patches
    expected = (p - p.mean(-1, keepdim=True)) / (p.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    keep = batch.is_target
    assert keep.sum() == 3 * 12  # 75% of 16 patches, all of them targets
    torch.testing.assert_close(out.teacher_features[keep], expected[keep])
    assert out.prediction.shape[-1] == 3 * 8 * 8  # one patch of pixels per query
    torch.testing.assert_close(out.loss, F.mse_loss(out.prediction[keep], expected[keep]))


def test_the_mae_encoder_sees_only_the_visible_patches():
    torch.manual_seed(0)
    model = MAE.MAE(M.JEPAConfig(loss="mse")).eval()
    batch = batch_of(torch.rand(2, 3, 32, 32))
    changed = M.MaskedBatch(**{**vars(batch), "hidden_patches": torch.rand_like(batch.hidden_patches)})
    # new pixels under the mask: the same context encoding, other targets
    torch.testing.assert_close(model.encode_context(changed), model.encode_context(batch))
    assert not torch.allclose(model.encode_targets(changed), model.encode_targets(batch))


def test_one_seed_gives_mae_sigreg_and_ijepa_the_same_initial_encoder():
    encoders = [T.initial_model(T.TrainConfig(steps=1, **kw)).student.state_dict() for kw in
                (dict(), dict(method="mae", loss="mse"), dict(method="sigreg"))]
    for other in encoders[1:]:
        assert all(torch.equal(encoders[0][k], other[k]) for k in encoders[0])


def test_a_training_step_leaves_the_teacher_slot_equal_to_the_encoder():
    cfg = T.TrainConfig(steps=1, method="mae", loss="mse")
    torch.manual_seed(0)
    model = T.build_model(cfg)
    optimizer = T.make_optimizer(model, cfg)
    T.training_step(model, optimizer, batch_of(torch.rand(4, 3, 32, 32)), momentum=0.998)
    student, teacher = model.student.state_dict(), model.teacher.state_dict()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    assert not torch.equal(student["patch_embed.weight"], T.initial_model(cfg).student.state_dict()["patch_embed.weight"])


@pytest.mark.parametrize("argv, message", [
    (["--method", "mae"], "--method mae regresses pixels with the mean squared error, as MAE does: add --loss mse"),
    (["--method", "pixels"], "--method pixels regresses pixels with the mean squared error, as MAE does: add --loss mse"),
    (["--method", "mae", "--loss", "mse", "--num-targets", "2"], "--masking, --num-targets and --context-scale apply to the JEPAs"),
    (["--method", "mae", "--loss", "mse", "--mask-ratio", "0"], "--mask-ratio must be between 0 and 1"),
    (["--method", "mae", "--loss", "mse", "--condition-encoders"], "--method mae has one"),
    (["--method", "byol"], "unknown method 'byol'"),
    (["--method", "sigreg", "--sigreg-weight", "2"], "--sigreg-weight must be from 0 to 1, got 2.0"),
    (["--method", "sigreg", "--sigreg-slices", "0"], "--sigreg-slices must be at least 1, got 0"),
])
def test_bad_method_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(argv)
    assert message in capsys.readouterr().err


def test_pixel_targets_with_ijepas_masks():
    # --method pixels: MAE's model (pixel targets, MSE) under I-JEPA's multi-block masks, the I-JEPA
    # paper's Table 7 ablation; --method mae hides a random share of the patches instead
    pixels = T.TrainConfig(method="pixels", loss="mse")
    assert isinstance(pixels.make_masking(), M.MultiBlockMasking) and type(T.build_model(pixels)) is MAE.MAE
    assert isinstance(T.TrainConfig(method="mae", loss="mse").make_masking(), MAE.RandomMasking)
    model = T.build_model(pixels)
    batch = M.mask_images(torch.rand(2, 3, 32, 32), 8, pixels.make_masking(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.encode_targets(batch), MAE.normalized_pixels(batch.hidden_patches))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mae", "pixels", "sigreg"])
def test_every_evaluation_takes_the_checkpoint_of_a_new_method(method, tmp_path):
    import json

    import evaluate as E

    extra = dict(loss="mse") if method in T.PIXEL_METHODS else dict(sigreg_slices=16)
    T.train(T.TrainConfig(steps=2, method=method, num_images=48, resolution=32, batch_size=16, out=str(tmp_path),
                          **extra), progress=False)
    ckpt = str(tmp_path / "checkpoint.pt")
    model, cfg = T.model_from_checkpoint(ckpt)
    assert cfg.method == method and type(model) is type(T.build_model(cfg))
    assert E.main(["probe", "--checkpoint", ckpt, "--labels", "shape", "--train", "60", "--test", "30", "--cache", "",
                   "--json", str(tmp_path / "probe.json")]) == 0
    shape = json.loads((tmp_path / "probe.json").read_text())["shape"]
    # teacher and student are one encoder: their features, hence their probes, are equal
    assert shape["teacher"]["per_layer_top1"] == shape["student"]["per_layer_top1"]
    assert shape["teacher"]["per_layer_top1"] != shape["random_init"]["per_layer_top1"]
    assert E.main(["depth", "--checkpoint", ckpt, "--train", "40", "--test", "10",
                   "--json", str(tmp_path / "depth.json")]) == 0
    assert {"teacher", "random_init"} <= set(json.loads((tmp_path / "depth.json").read_text()))


def test_a_perfect_decoder_reconstructs_the_image_and_the_visible_part_is_the_context(monkeypatch):
    torch.manual_seed(0)
    model = MAE.MAE(M.JEPAConfig(model="micro", loss="mse"))
    images = torch.rand(3, 3, 32, 32)
    # a decoder that predicts exactly the targets (each hidden patch's normalised pixels)
    monkeypatch.setattr(model, "predict", lambda context, batch: MAE.normalized_pixels(batch.hidden_patches))
    got = MAE.reconstruct(model, images, MAE.RandomMasking(0.75), torch.Generator().manual_seed(1))
    torch.testing.assert_close(got["reconstruction"], images, atol=1e-4, rtol=1e-4)
    hidden = (got["visible"] == 0).all(1)  # (N, H, W): blanked pixels
    assert torch.allclose(got["visible"][~hidden[:, None].expand_as(images)], images[~hidden[:, None].expand_as(images)])
    assert hidden.float().mean() == pytest.approx(0.75, abs=0.01)  # 12 of 16 patches hidden in each image
