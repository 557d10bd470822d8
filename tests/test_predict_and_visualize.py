"""predict_and_visualize.py: retrieval, the baseline and the decoder on problems with known answers;
the teacher features are the loss's targets; masks are the training masking's; the command line's
errors are one line; a small end-to-end run writes its figures and numbers, and `run` returns the
objects behind them, the same numbers for the notebook as for the command line."""

import json
import math

import torch
import torch.nn.functional as F

import data
import evaluate as E
import models as M
import predict_and_visualize as PV
import train as T


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return M.IJEPA(M.JEPAConfig(model="micro"))


def scenes(n, split="test"):
    ds = data.SceneDataset(n, resolution=32, split=split)
    return ds.tensors()[0], ds.regions()


# ---------------------------------------------------------------------------------------------
# retrieval


def test_retrieve_finds_the_known_neighbours_in_order_and_skips_the_own_image():
    # gallery: 8 unit directions in 8-D, each scaled (cosine ignores the norm); the query leans on
    # directions 3 > 5 > 1 > 6 > 0 in that order, so those are its top 5 and 3 is its top 1
    gallery = torch.eye(8) * torch.arange(1.0, 9.0)[:, None]
    weights = torch.zeros(8)
    weights[[3, 5, 1, 6, 0]] = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1])
    queries = torch.stack([weights, -weights])  # the second points away from them all
    sim, idx = PV.retrieve(queries, gallery, k=5)
    assert idx[0].tolist() == [3, 5, 1, 6, 0]
    assert torch.allclose(sim[0], weights[[3, 5, 1, 6, 0]] / weights.norm())
    assert set(idx[1, :3].tolist()) == {2, 4, 7} and idx[1, 3:].tolist() == [0, 6]  # cosine 0 (a tie), then the least negative
    # gallery items 3 and 5 belong to image 1: a query of image 1 never gets them
    gallery_image = torch.tensor([0, 0, 0, 1, 0, 1, 0, 0])
    sim, idx = PV.retrieve(queries[:1], gallery, k=5, query_image=torch.tensor([1]), gallery_image=gallery_image)
    assert idx[0, :3].tolist() == [1, 6, 0] and not {3, 5} & set(idx[0].tolist())  # then 2, 4, 7 tie at 0
    # a query of image 0 may only get the two items of image 1; the other columns are -inf
    sim, idx = PV.retrieve(queries[:1], gallery, k=5, query_image=torch.tensor([0]), gallery_image=gallery_image)
    assert idx[0, :2].tolist() == [3, 5] and torch.all(sim[0, 2:] == float("-inf"))


def test_true_patch_rank_counts_what_beats_the_true_patch():
    # one query image of 4 patches with orthogonal features; a gallery of other images
    own = torch.eye(4)[None]  # (1, T=4, D=4)
    queries = PV.Patches(own, torch.zeros(1, 4, 3), None, torch.tensor([0]), (2, 2))
    predictions = torch.tensor([[1.0, 0, 0, 0],     # exactly its true patch 0: rank 0
                                [0.6, 0.8, 0, 0],   # true patch 1 (0.8); own patch 0 (0.6) is below: rank 0
                                [0, 0.8, 0.6, 0],   # true patch 2 (0.6); own patch 1 (0.8) beats it: rank 1
                                [0, 0, 0, 1.0]])    # true patch 3, but 6 gallery items are as close: rank 6
    predicted = PV.Predicted(predictions, torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 3]),
                             torch.zeros(1, 4, dtype=torch.bool), None, (2, 2))
    gallery_similarity = torch.tensor([[0.5] * 5, [0.9, 0.1, 0.1, 0.1, 0.1], [0.1] * 5, [1.0] * 5])  # (Q, k=5)
    rank = PV.true_patch_rank(predicted, queries, gallery_similarity).tolist()
    assert rank == [0, 1, 1, 5]  # the second: one gallery item (0.9) beats 0.8; the last: the count stops at k
    assert [r < 1 for r in rank] == [True, False, False, False] and [r < 5 for r in rank] == [True, True, True, False]


def test_prediction_metrics_top1_is_perfect_for_the_teacher_itself_and_region_follows_the_maps():
    # predictions equal to the true teacher features: the true patch is always the nearest
    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(5, 16, 32, generator=g), dim=2)
    regions = torch.randint(0, 4, (5, 16), generator=g)
    pool = PV.Patches(features, torch.rand(5, 16, 12, generator=g), regions, torch.arange(5), (4, 4))
    image, index = torch.arange(3).repeat_interleave(4), torch.tensor([0, 5, 10, 15] * 3)
    predicted = PV.Predicted(features[image, index], image, index, torch.zeros(3, 16, dtype=torch.bool), None, (4, 4))
    got = PV.prediction_metrics(predicted, pool.first(3), pool)
    assert torch.all(got.per_image["top1"] == 1) and torch.allclose(got.per_image["cosine"], torch.ones(3, dtype=torch.float64))
    # the nearest patch with the own image excluded is never from the own image, and same_region is
    # exactly the comparison of the two patches' region codes
    assert torch.all(got.retrieved // 16 != image)
    expected = (regions.flatten()[got.retrieved] == regions[image, index]).double()
    assert torch.allclose(got.per_image["same_region"], PV.per_image_mean(expected, image, 3))


# ---------------------------------------------------------------------------------------------
# the position-only baseline, the decoder, PCA


def test_position_only_baseline_is_the_per_position_mean():
    g = torch.Generator().manual_seed(1)
    train_features = torch.randn(7, 6, 5, generator=g)  # 7 images, 6 positions, 5 channels
    index = torch.tensor([0, 5, 5, 2])
    got = PV.position_mean_features(train_features, index)
    direct = torch.stack([sum(train_features[n, i] for n in range(7)) / 7 for i in index.tolist()])
    assert torch.allclose(got, direct, atol=1e-6)


def test_decoder_training_lowers_its_error_and_recovers_a_linear_map():
    g = torch.Generator().manual_seed(2)
    W, b = torch.randn(16, 12, generator=g) * 0.3, torch.rand(12, generator=g)
    x = torch.randn(3000, 16, generator=g) * 2 + 1  # off-centre and scaled: the decoder standardises
    decoder, losses = PV.train_pixel_decoder(x[:2000], x[:2000] @ W + b, hidden=0, steps=600, batch_size=256,
                                             lr=2e-2)
    assert sum(losses[-20:]) / 20 < 0.01 * sum(losses[:5]) / 5
    with torch.no_grad():
        err = ((decoder(x[2000:]) - (x[2000:] @ W + b)) ** 2).mean() / (x[2000:] @ W + b).var()
        assert err < 1e-3  # held-out pixels: the map itself was found
        # the linear decoder's own map, unfolded from its standardisation, is W
        weight = decoder.net.weight.T / decoder.std[:, None]
        assert torch.allclose(weight, W, atol=0.02)
    _, mlp_losses = PV.train_pixel_decoder(x[:2000], x[:2000] @ W + b, hidden=32, steps=200, batch_size=256)
    assert sum(mlp_losses[-20:]) < 0.5 * sum(mlp_losses[:20])  # the MLP (the default) learns too


def test_pca_colours_share_one_projection_and_stay_in_range():
    g = torch.Generator().manual_seed(3)
    spread = torch.tensor([5.0, 2.0, 1.0, 0.1, 0.1, 0.1])  # the principal axes are the first three channels
    fit = torch.randn(2000, 6, generator=g) * spread
    colours, again = PV.pca_colours(fit, fit, fit[:10].clone())
    assert colours.shape == (2000, 3) and colours.min() >= 0 and colours.max() <= 1
    assert torch.equal(colours[:10], again)  # the same features get the same colours
    # walking along the largest axis raises red (its sign is fixed) and leaves green and blue alone
    walk = torch.zeros(5, 6)
    walk[:, 0] = torch.linspace(-6, 6, 5)
    (c,) = PV.pca_colours(fit, walk)
    assert torch.all(c[1:, 0] > c[:-1, 0]) and (c[:, 1:].max(0).values - c[:, 1:].min(0).values).max() < 0.05


def test_teacher_targets_are_the_losses_targets_at_every_target():
    model = tiny_model()
    with torch.no_grad():  # an affine norm that is not the identity, so the feature norm has work to do
        model.teacher.norm.weight.uniform_(0.5, 2.0)
        model.teacher.norm.bias.normal_()
    images, _ = scenes(6)
    masking = M.make_masking("multiblock")
    batch = M.mask_images(data.normalize(images), 8, masking, torch.Generator().manual_seed(0))
    with torch.no_grad():
        targets = model.encode_targets(batch)[batch.is_target]  # (Q, D) what the loss compares with
    whole = PV.teacher_targets(model, images)  # (N, T, D)
    pos = batch.hidden_pos[batch.is_target]
    assert torch.allclose(whole[batch.hidden_sample[batch.is_target], pos[:, 0] * 4 + pos[:, 1]], targets, atol=1e-4)
    with torch.no_grad():  # and the teacher's output before the feature norm is not
        assert not torch.allclose(model.teacher.encode(data.normalize(images)), whole, atol=1e-2)


def test_mask_and_predict_uses_the_training_masks_and_the_models_own_stages():
    model = tiny_model()
    images, _ = scenes(5)
    masking = M.make_masking("multiblock")
    got = PV.mask_and_predict(model, images, masking, seed=7, batch_size=2)
    # the same masks as the plain masking with the same seed (keeping the masks changes no draw)
    batch = M.mask_images(data.normalize(images), 8, masking, torch.Generator().manual_seed(7))
    pos = batch.hidden_pos[batch.is_target]
    assert torch.equal(got.image, batch.hidden_sample[batch.is_target])
    assert torch.equal(got.index, pos[:, 0] * 4 + pos[:, 1])
    with torch.no_grad():
        direct = model.predict(model.encode_context(batch), batch)[batch.is_target]
    assert torch.allclose(got.features, direct, atol=1e-5)
    # context and targets are disjoint; the kept blocks are the targets, split as the masking drew them
    target = got.is_target()
    assert not (target & got.context).any()
    for i, blocks in enumerate(got.blocks):
        assert 1 <= len(blocks) <= masking.num_targets and torch.equal(torch.stack(blocks).any(0), target[i])
    assert max(len(blocks) for blocks in got.blocks) == masking.num_targets
    # another model gets the same masks from the same seed
    other = PV.mask_and_predict(tiny_model(seed=1), images, masking, seed=7)
    assert torch.equal(other.image, got.image) and torch.equal(other.index, got.index)
    assert not torch.allclose(other.features, got.features)


def test_initial_model_is_the_runs_starting_point(tiny_checkpoint):
    model, cfg = T.model_from_checkpoint(tiny_checkpoint)
    initial = T.initial_model(cfg)
    reference = E.checkpoint_encoders(tiny_checkpoint)[0]["random_init"]
    for a, b in zip(initial.teacher.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(initial.predictor.proj.weight, model.predictor.proj.weight)  # training moved it


# ---------------------------------------------------------------------------------------------
# the command line


# tiny_checkpoint: tests/conftest.py (one 3-step micro run per session, shared with other files)


SMALL = ["--num-images", "6", "--gallery-size", "6", "--train-images", "16", "--decoder-steps", "20"]


def test_main_writes_the_figures_and_the_promised_json(tiny_checkpoint, tmp_path, capsys, picture):
    out = tmp_path / "result.json"
    assert PV.main(["--checkpoint", tiny_checkpoint, *SMALL, "--out", str(tmp_path / "figures"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for name in ("ijepa_predictions.png", "ijepa_predictions_decoded.png", "ijepa_predictions_pca.png"):
        picture(tmp_path / "figures" / name)  # opens, and is not one flat colour
    assert set(result["metrics"]) == {"trained", "random_init", "position_only"}
    for name in result["metrics"]:
        assert set(result["metrics"][name]) == {"top1", "top5", "same_region", "cosine", "pixel_mse"}
        for value in result["metrics"][name].values():
            assert set(value) == {"mean", "se"} and math.isfinite(value["se"])  # 6 images: a spread exists
        assert 0 <= result["metrics"][name]["top1"]["mean"] <= result["metrics"][name]["top5"]["mean"] <= 1
    assert set(result["trained_minus"]) == {"random_init", "position_only"}
    assert result["num_images"] == 6 and result["gallery_images"] == 6 and result["targets"] > 6
    assert "retrieval top-1" in capsys.readouterr().out


def test_run_gives_the_notebook_the_numbers_of_the_command_line_and_the_objects_behind_them(tiny_checkpoint, tmp_path,
                                                                                            picture):
    script = tmp_path / "result.json"
    assert PV.main(["--checkpoint", tiny_checkpoint, *SMALL, "--out", "", "--json", str(script)]) == 0
    torch.manual_seed(123)  # a notebook's earlier cells may have drawn from the global random state
    torch.rand(7)
    result = PV.run(tiny_checkpoint, num_images=6, gallery_size=6, train_images=16, decoder_steps=20,
                    out=tmp_path / "figures", progress=False)  # the notebook's call (a Path, as its FIGURES)
    script, notebook = json.loads(script.read_text()), PV.json_ready(result.summary)
    for key in ("metrics", "trained_minus", "decoder_on_teacher_features", "targets", "decoder"):
        assert notebook[key] == script[key], key  # exactly: the same seed, the same numbers
    assert result.summary["figures"] == [str(tmp_path / "figures" / name) for name in
                                         ("ijepa_predictions.png", "ijepa_predictions_decoded.png", "ijepa_predictions_pca.png")]
    for path in result.summary["figures"]:
        picture(path)
    # the objects: each model's Evaluated is where its summary comes from
    assert set(result.evaluated) == set(PV.MODELS) and set(result.models) == {"trained", "random_init"}
    for name in PV.MODELS:
        assert PV.summarise(result.evaluated[name].measured) == result.summary["metrics"][name]
        assert torch.equal(result.evaluated[name].predicted.index, result.evaluated["trained"].predicted.index)
    trained, baseline = result.evaluated["trained"], result.evaluated["position_only"]
    assert len(trained.decoder_losses) == 20 and baseline.decoder is trained.decoder
    assert torch.allclose(baseline.predicted.features,
                          PV.position_mean_features(trained.train.features, trained.predicted.index))
    start = T.initial_model(result.cfg)
    for a, b in zip(start.state_dict().values(), result.models["random_init"].state_dict().values()):
        assert torch.equal(a, b)


def test_main_on_a_folder_says_that_regions_are_not_measured(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    (tmp_path / "images" / "things").mkdir(parents=True)
    for i in range(12):
        pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "images" / "things" / f"{i}.png")
    out = tmp_path / "result.json"
    assert PV.main(["--checkpoint", tiny_checkpoint, "--dataset", str(tmp_path / "images"), *SMALL,
                    "--out", "", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "same_region" not in result["metrics"]["trained"] and "no region maps" in result["notes"][0]
    assert "no region maps" in capsys.readouterr().out


def test_bad_inputs_are_one_line_errors(tiny_checkpoint, tmp_path, capsys):
    def error(argv):
        assert PV.main(["--out", "", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("predict_and_visualize.py: error: ") and err.count("\n") == 1, err
        return err

    (tmp_path / "empty").mkdir()
    assert "no images" in error(["--checkpoint", tiny_checkpoint, "--dataset", str(tmp_path / "empty")])
    assert "not a known dataset" in error(["--checkpoint", tiny_checkpoint, "--dataset", str(tmp_path / "missing")])
    assert "smaller than one 8x8 patch" in error(["--checkpoint", tiny_checkpoint, "--resolution", "4"])
    assert "multiples of the patch size 8" in error(["--checkpoint", tiny_checkpoint, "--resolution", "36"])
    assert "--gallery-size 2 or more" in error(["--checkpoint", tiny_checkpoint, "--gallery-size", "0"])
    assert "--gallery-size 2 or more" in error(["--checkpoint", tiny_checkpoint, "--gallery-size", "1"])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert "truncated or corrupt" in error(["--checkpoint", str(corrupt)])
    assert "no checkpoint at" in error(["--checkpoint", str(tmp_path / "none.pt")])
    other = torch.load(tiny_checkpoint, weights_only=True)
    other["config"]["model"] = "tiny"  # weights of micro under the config of another preset
    T.save_checkpoint(str(tmp_path / "other.pt"), other)
    assert "do not fit" in error(["--checkpoint", str(tmp_path / "other.pt")])
    mae = T.train(T.TrainConfig(steps=1, method="mae", loss="mse", num_images=48, resolution=32, batch_size=16,
                                out=str(tmp_path / "mae")), progress=False)
    assert mae.steps == 1 and "checkpoint of --method mae: its decoder predicts pixels" in \
        error(["--checkpoint", str(tmp_path / "mae" / "checkpoint.pt")])
