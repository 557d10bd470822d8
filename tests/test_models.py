"""Behaviour of models.py: shapes, positions, attention isolation, masking, feature norms, EMA, learning."""

import math
import os
import socket
import time

import pytest
import torch
import torch.nn.functional as F

import models as M


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def split(image, masking=None, seed=0, patch=8):
    return M.split_image(image, patch, masking or M.MultiBlockMasking(), gen(seed))


# ---------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("preset", [pytest.param(p, marks=[pytest.mark.slow] if p != "micro" else []) for p in sorted(M.PRESETS)])
@pytest.mark.parametrize("hw", [(32, 32), (48, 80), (96, 32)])
def test_encoder_shapes_every_preset(preset, hw):
    cfg = M.JEPAConfig(model=preset, patch_size=16).encoder_config()
    enc = M.VisionTransformer(cfg)
    images = torch.rand(2, 3, *hw)
    out, layers = enc.encode(images, return_layers=True)
    n = (hw[0] // 16) * (hw[1] // 16)
    assert out.shape == (2, n, cfg.dim)
    assert len(layers) == cfg.depth and all(t.shape == (2, n, cfg.dim) for t in layers)


def test_predictor_outputs_only_target_slots():
    model = M.IJEPA(M.JEPAConfig(patch_size=8))
    batch = M.mask_images(torch.rand(3, 3, 64, 48), 8, M.MultiBlockMasking(), gen())
    out = model(batch)
    assert out.token_loss.shape == (int(batch.is_target.sum()),)
    assert out.prediction[out.is_target].shape == (int(batch.is_target.sum()), 128)
    assert out.token_pos[:, 0].max() < 8 and out.token_pos[:, 1].max() < 6


# ---------------------------------------------------------------------------------------------
# positions


def test_sincos_matches_direct_formula():
    dim, h, w = 16, 5, 7
    table = M.sincos_2d(M.grid_coords(h, w), dim)  # (h*w, dim)
    q = dim // 4
    for r in range(h):
        for c in range(w):
            expected = []
            for x in (c, r):  # first half: column, second half: row
                expected += [math.sin(x / 10000 ** (k / q)) for k in range(q)]
                expected += [math.cos(x / 10000 ** (k / q)) for k in range(q)]
            torch.testing.assert_close(table[r * w + c], torch.tensor(expected), atol=1e-6, rtol=0)


def test_sincos_of_packed_coordinates_equals_grid_table():
    table = M.sincos_2d(M.grid_coords(6, 4), 32)
    pos = torch.tensor([[5, 3], [0, 0], [2, 1]])
    torch.testing.assert_close(M.sincos_2d(pos, 32), table[[23, 0, 9]])


def test_patchify_roundtrip_and_raster_order():
    images = torch.rand(2, 3, 16, 24)
    patches = M.patchify(images, 8)
    assert patches.shape == (2, 6, 192)
    torch.testing.assert_close(patches[0, 4].reshape(3, 8, 8), images[0, :, 8:16, 8:16])  # row 1, col 1
    torch.testing.assert_close(M.unpatchify(patches, (2, 3), 8), images)


def test_patch_embedding_equals_official_conv():
    enc = M.VisionTransformer(M.ViTConfig(dim=32, depth=1, heads=2, patch_size=8))
    images = torch.rand(2, 3, 16, 16)
    conv = F.conv2d(images, enc.patch_embed.weight.reshape(32, 3, 8, 8), enc.patch_embed.bias, stride=8)
    ours = enc.patch_embed(M.patchify(images, 8))  # (B, N, D)
    torch.testing.assert_close(ours, conv.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the attention-mask convention


def two_image_row(a, b, masking=None):
    """A packed batch whose single row holds images a and b, plus trailing padding."""
    sa, sb = split(a, masking, 1), split(b, masking, 2)
    lc = len(sa.context_pos) + len(sb.context_pos) + 5
    lt = len(sa.hidden_pos) + len(sb.hidden_pos) + 5
    return M.MaskedBatch.from_rows([[sa, sb]], lc, lt)


def test_attention_mask_convention():
    sample = torch.tensor([[0, 0, 1, -1]])
    mask = M.attention_mask(sample)[0, 0]
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_no_attention_leak_between_samples():
    torch.manual_seed(0)
    model = M.IJEPA(M.JEPAConfig())
    a, b = torch.rand(3, 32, 32), torch.rand(3, 32, 32)
    batch1 = two_image_row(a, b)
    batch2 = two_image_row(torch.rand(3, 32, 32), b)  # only image 0's pixels change
    with torch.no_grad():
        out1, out2 = model(batch1), model(batch2)
        ctx1 = model.student(batch1.context_patches, batch1.context_pos, batch1.context_sample)
        ctx2 = model.student(batch2.context_patches, batch2.context_pos, batch2.context_sample)
    other = batch1.context_sample == 1
    assert torch.equal(ctx1[other], ctx2[other])  # bit-identical
    assert not torch.allclose(ctx1[batch1.context_sample == 0], ctx2[batch1.context_sample == 0])
    keep = out1.token_sample == 1
    assert torch.equal(out1.token_loss[keep], out2.token_loss[keep])
    assert torch.equal(out1.prediction[out1.is_target][keep], out2.prediction[out2.is_target][keep])


def test_padding_never_changes_a_real_token():
    torch.manual_seed(0)
    model = M.IJEPA(M.JEPAConfig(feature_norm="batchnorm"))
    s = split(torch.rand(3, 64, 64))
    tight = M.MaskedBatch.from_rows([[s]], len(s.context_pos), len(s.hidden_pos))
    padded = M.MaskedBatch.from_rows([[s]], len(s.context_pos) + 17, len(s.hidden_pos) + 9)
    padded.context_patches[0, len(s.context_pos):] = 7.0  # garbage in padding slots
    padded.hidden_patches[0, len(s.hidden_pos):] = -3.0
    with torch.no_grad():
        o1, o2 = model(tight), model(padded)
    torch.testing.assert_close(o1.token_loss, o2.token_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o1.prediction[o1.is_target], o2.prediction[o2.is_target], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(o2.loss)


def test_drop_padding_puts_real_tokens_first_and_restore_padding_undoes_it():
    x = torch.arange(12.0).reshape(2, 6, 1)
    sample = torch.tensor([[0, -1, 0, 0, -1, -1], [-1, 1, -1, 1, -1, -1]])
    tokens, ids, kept = M.drop_padding(x, sample)
    # each row's real tokens first, in order; the rows are as long as the longest real row (3)
    assert torch.equal(ids, torch.tensor([[0, 0, 0], [1, 1, -1]]))
    assert torch.equal(tokens[:2, :2, 0], torch.tensor([[0.0, 2.0], [7.0, 9.0]]))
    assert tokens[0, 2, 0] == 3.0 and ids[1, 2] == -1  # row 1 keeps one padding slot to fill its row
    back = M.restore_padding(tokens, kept, 6)
    real = sample >= 0
    assert torch.equal(back[real], x[real])
    assert torch.equal(back[0, [1, 4, 5], 0], torch.zeros(3))  # the slots it cut are 0
    # nothing to cut: the same tensors back, and nothing to restore
    full = torch.tensor([[0, 0, 0], [1, 1, 1]])
    tokens, ids, kept = M.drop_padding(x[:, :3], full)
    assert kept is None and tokens is not None and torch.equal(tokens, x[:, :3]) and ids is full


@pytest.mark.parametrize("feature_norm", ["layernorm", "batchnorm"])
def test_dropping_padding_gives_every_real_token_the_same_output_and_gradient(feature_norm, monkeypatch):
    """The blocks run without the padding no row needs (`drop_padding`); under torch.compile
    nothing is cut and the attention mask keeps real tokens from padding. Both paths agree."""
    torch.manual_seed(0)
    model = M.IJEPA(M.JEPAConfig(feature_norm=feature_norm))
    batch = M.mask_images(torch.rand(6, 3, 48, 48), 8, M.MultiBlockMasking(), torch.Generator().manual_seed(0))
    patches, _, sample = batch.whole_images()
    assert M.drop_padding(patches, sample)[2] is not None  # the teacher's stream has padding to cut

    def run():
        model.zero_grad()
        out = model(batch)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    dropped, grads_dropped = run()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the compiled path: nothing is cut
    kept, grads_kept = run()
    close = {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(dropped.loss, kept.loss, **close)
    torch.testing.assert_close(dropped.token_loss, kept.token_loss, **close)
    torch.testing.assert_close(dropped.prediction[dropped.is_target], kept.prediction[kept.is_target], **close)
    real = batch.hidden_sample >= 0
    torch.testing.assert_close(dropped.teacher_features[real], kept.teacher_features[real], **close)
    for a, b in zip(grads_dropped, grads_kept):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_padding_mask_passed_as_attention_mask_is_the_bug():
    """SDPA's boolean mask means True = may attend. Passing a padding mask (True = pad) instead
    makes real tokens attend to padding: the outputs change. The correct mask gives the same
    result as the unpadded sequence."""
    torch.manual_seed(0)
    attn = M.Attention(32, 4)
    x = torch.randn(1, 6, 32)
    sample = torch.tensor([[0, 0, 0, 0, -1, -1]])
    with torch.no_grad():
        alone = attn(x[:, :4], M.attention_mask(sample[:, :4]))
        right = attn(x, M.attention_mask(sample))[:, :4]
        padding_mask = (sample < 0)[:, None, None, :]  # True = padding: the wrong convention
        wrong = attn(x, padding_mask)[:, :4]
    torch.testing.assert_close(right, alone, atol=1e-6, rtol=1e-5)
    assert (wrong - alone).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# masking


@pytest.mark.parametrize("masking, grid", [(M.MultiBlockMasking(), (8, 8)), (M.MultiBlockMasking(), (6, 10)),
                                           (M.MultiBlockMasking(), (14, 14)), (M.WindowMasking(), (8, 12))])
def test_masks_disjoint_and_cover_every_patch(masking, grid):
    h, w = grid
    g = gen()
    seen_ctx, seen_tgt = torch.zeros(h * w, dtype=torch.bool), torch.zeros(h * w, dtype=torch.bool)
    for _ in range(2000):
        m = masking(h, w, g)
        assert len(m.context) > 0 and len(m.target) > 0
        assert not set(m.context.tolist()) & set(m.target.tolist())
        seen_ctx[m.context] = True
        seen_tgt[m.target] = True
    assert seen_ctx.all() and seen_tgt.all(), "every patch (last row and column included) is reachable"


def test_multiblock_terminates_on_every_grid_from_4_to_32():
    masking, g = M.MultiBlockMasking(), gen()
    for h in range(4, 33):
        for w in range(4, 33):
            m = masking(h, w, g)
            assert len(m.context) >= min(10, math.ceil(0.1 * h * w)) and len(m.target) > 0


def test_multiblock_fallback_keeps_enough_context():
    # Huge targets leave almost no context: the bounded retries must end in the fallback.
    masking = M.MultiBlockMasking(target_scale=(0.6, 0.7), attempts=3)
    g = gen()
    for _ in range(50):
        m = masking(5, 5, g)
        assert len(m.context) >= 3 and len(m.target) > 0
        assert torch.equal(torch.cat(m.blocks).unique(), m.target)  # the blocks kept after the fallback


def test_multiblock_returns_its_target_blocks_as_rectangles():
    masking, g = M.MultiBlockMasking(), gen()
    for _ in range(200):
        m = masking(8, 8, g)
        assert 1 <= len(m.blocks) <= masking.num_targets
        assert torch.equal(torch.cat(m.blocks).unique(), m.target)
        for block in m.blocks:
            rows, cols = block // 8, block % 8
            height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
            assert len(block) == height * width  # a full rectangle


def test_multiblock_scale_and_aspect_are_independent():
    masking, g = M.MultiBlockMasking(), gen()
    areas, aspects = [], []
    for _ in range(3000):
        block = masking.block(32, 32, masking.target_scale, masking.target_aspect, g)
        rows, cols = block.any(1).sum().item(), block.any(0).sum().item()
        areas.append(rows * cols)
        aspects.append(rows / cols)
    corr = torch.corrcoef(torch.tensor([areas, aspects], dtype=torch.float64))[0, 1]
    assert abs(corr) < 0.15, f"block area and aspect correlate ({corr:.2f}): drawn from one number?"


def test_masks_are_reproducible_and_per_image_lengths_are_kept():
    images = torch.rand(6, 3, 64, 64)
    b1 = M.mask_images(images, 8, M.MultiBlockMasking(), gen(3))
    b2 = M.mask_images(images, 8, M.MultiBlockMasking(), gen(3))
    assert torch.equal(b1.context_pos, b2.context_pos) and torch.equal(b1.is_target, b2.is_target)
    lengths = (b1.context_sample >= 0).sum(1)
    assert len(set(lengths.tolist())) > 1, "no truncation to the batch's shortest context"


def test_window_masking_works_in_windows():
    m = M.WindowMasking(window=2)(8, 8, gen())
    grid = torch.zeros(64, dtype=torch.bool)
    grid[m.context] = True
    windows = grid.reshape(4, 2, 4, 2).permute(0, 2, 1, 3).reshape(16, 4)
    assert ((windows.sum(1) == 0) | (windows.sum(1) == 4)).all()
    assert 0.25 * 16 - 1 <= windows.all(1).sum() <= 0.5 * 16 + 1


def test_split_streams_hold_the_whole_image_once():
    image = torch.rand(3, 48, 64)
    s = split(image)
    pos = torch.cat([s.context_pos, s.hidden_pos])
    assert len(pos) == 6 * 8 and len({tuple(p) for p in pos.tolist()}) == 48
    rebuilt = torch.zeros(48, 3 * 64)
    rebuilt[pos[:, 0] * 8 + pos[:, 1]] = torch.cat([s.context_patches, s.hidden_patches])
    torch.testing.assert_close(M.unpatchify(rebuilt[None], (6, 8), 8)[0], image)


# ---------------------------------------------------------------------------------------------
# feature normalisation, initialisation, EMA


def test_batchnorm_targets_use_valid_tokens_only():
    feats = torch.randn(2, 5, 4)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    out = M.apply_feature_norm(feats, valid, "batchnorm")
    feats2 = feats.clone()
    feats2[~valid] = 100.0
    torch.testing.assert_close(M.apply_feature_norm(feats2, valid, "batchnorm")[valid], out[valid])
    feats2[~valid] = float("inf")  # selected out, not multiplied by 0
    torch.testing.assert_close(M.apply_feature_norm(feats2, valid, "batchnorm")[valid], out[valid])
    torch.testing.assert_close(out[valid].mean(0), torch.zeros(4), atol=1e-5, rtol=0)


def _global_batch():
    features = torch.randn(4, 5, 8, generator=gen(1)) * 3 + 1
    valid = torch.rand(4, 5, generator=gen(2)) < 0.6
    return features, valid


def _two_ranks_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.distributed.init_process_group("gloo")
    features, valid = _global_batch()
    mine = slice(2 * rank, 2 * rank + 2)  # each rank holds half of the global batch
    targets = M.apply_feature_norm(features[mine], valid[mine], "batchnorm")
    loss = M.sum_over_ranks(torch.tensor(float("nan") if rank == 1 else 0.5))  # only rank 1's is NaN
    torch.save({"targets": targets, "loss": loss}, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_batchnorm_statistics_and_sums_are_over_every_rank(tmp_path):
    # Under DistributedDataParallel the batchnorm targets of each rank's half of a batch are those
    # of the whole batch in one process, and a sum over ranks reaches every rank (a NaN included).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.start_processes(_two_ranks_worker, args=(port, str(tmp_path)), nprocs=2,
                                                join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish in 120 s")
    features, valid = _global_batch()
    whole = M.apply_feature_norm(features, valid, "batchnorm")
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        mine = slice(2 * rank, 2 * rank + 2)
        torch.testing.assert_close(saved["targets"][valid[mine]], whole[mine][valid[mine]])
        assert torch.isnan(saved["loss"])


def test_layernorm_targets_have_equal_norms():
    out = M.apply_feature_norm(torch.randn(2, 5, 16) * torch.rand(2, 5, 1) * 10, None, "layernorm")
    torch.testing.assert_close(out.norm(dim=-1), torch.full((2, 5), 4.0), atol=1e-3, rtol=0)


@pytest.mark.parametrize("mode, norms_equal", [("layernorm", True), ("dyntanh", False), ("batchnorm", False), ("none", False)])
def test_each_feature_norm_is_the_one_normalisation_of_the_targets(mode, norms_equal):
    # "none" and "batchnorm" start from the last block's raw output (no LayerNorm hidden in the
    # encoder); only "layernorm" gives every target token the same norm.
    torch.manual_seed(0)
    model = M.IJEPA(M.JEPAConfig(feature_norm=mode))
    expected = {"layernorm": torch.nn.LayerNorm, "dyntanh": M.DynTanh}.get(mode, torch.nn.Identity)
    assert type(model.teacher.norm) is expected and type(model.student.norm) is expected
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out, layers = model.teacher.encode(images, return_layers=True)
        batch = M.mask_images(images, 8, M.MultiBlockMasking(), gen())
        targets = model(batch).teacher_features[batch.is_target]
    if mode in ("batchnorm", "none"):
        assert torch.equal(out, layers[-1])  # the raw output of the last block
    norms = targets.norm(dim=-1)
    assert (float(norms.std() / norms.mean()) < 1e-4) == norms_equal


def test_init_is_the_truncated_normal_the_docstring_states():
    torch.manual_seed(0)
    enc = M.VisionTransformer(M.ViTConfig(dim=384, depth=4, heads=6))
    qkv = enc.blocks[0].attn.qkv.weight.detach()
    # N(0, 0.02) cut at +-2 std: std 0.02 * 0.8796 = 0.0176, nothing beyond 0.04
    assert float(qkv.std()) == pytest.approx(0.0176, rel=0.02) and float(qkv.abs().max()) <= 0.04
    assert float(enc.blocks[0].attn.qkv.bias.detach().abs().max()) == 0.0
    for layer, block in enumerate(enc.blocks, start=1):  # residual projections rescaled by 1/sqrt(2 layer)
        ratio = float(block.mlp.fc2.weight.detach().std() / block.mlp.fc1.weight.detach().std())
        assert ratio == pytest.approx(1 / math.sqrt(2 * layer), rel=0.05)


def test_ema_update_arithmetic_and_dyntanh_alpha_follows():
    model = M.IJEPA(M.JEPAConfig(feature_norm="dyntanh"))
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.9)
    for t0, t, s in zip(teacher_before, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    alpha_t, alpha_s = model.teacher.norm.alpha, model.student.norm.alpha
    torch.testing.assert_close(alpha_t, 0.9 * torch.full_like(alpha_t, 0.5) + 0.1 * alpha_s)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_residual_projections_are_rescaled_at_init():
    torch.manual_seed(0)
    enc = M.VisionTransformer(M.ViTConfig(dim=192, depth=8, heads=3))
    first, last = enc.blocks[0].mlp.fc2.weight.detach().std(), enc.blocks[7].mlp.fc2.weight.detach().std()
    assert float(first / last) == pytest.approx(math.sqrt(8), rel=0.1)


# ---------------------------------------------------------------------------------------------
# learning


@pytest.mark.slow
@pytest.mark.parametrize("masking", ["multiblock", "window"])
def test_loss_halves_within_100_steps_on_a_fixed_batch(masking):
    torch.manual_seed(0)
    model = M.IJEPA(M.JEPAConfig(model="micro", patch_size=8))
    batch = M.mask_images(torch.rand(8, 3, 32, 32), 8, M.make_masking(masking), gen())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.04)
    losses = []
    for step in range(100):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_teacher(0.996 + 0.004 * step / 100)  # the official linear schedule
        losses.append(loss.item())
        if losses[-1] <= 0.5 * losses[0]:
            break
    assert losses[-1] <= 0.5 * losses[0], f"loss went {losses[0]:.4f} -> {losses[-1]:.4f} in 100 steps"


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_unused_slots_never_reach_the_loss(bad):
    # The loss selects the target slots: an inf or NaN in a slot that is not a target (padding,
    # or what the predictor writes there) leaves the loss and the gradients as they were.
    torch.manual_seed(0)
    model = M.IJEPA(M.JEPAConfig())
    batch = M.mask_images(torch.rand(3, 3, 32, 32), 8, M.MultiBlockMasking(), gen())
    assert (~batch.is_target).any()
    prediction, targets = torch.randn(2, *batch.is_target.shape, 128)
    clean = model.loss(prediction, targets, batch)
    unused = ~batch.is_target[..., None]
    dirty_prediction = prediction.masked_fill(unused, bad).requires_grad_()
    dirty = model.loss(dirty_prediction, targets.masked_fill(unused, bad), batch)
    assert torch.equal(dirty.loss, clean.loss) and torch.equal(dirty.loss_per_slot, clean.loss_per_slot)
    dirty.loss.backward()
    assert torch.isfinite(dirty_prediction.grad).all()


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_errors():
    enc = M.VisionTransformer(M.JEPAConfig().encoder_config())
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        enc.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\)"):
        enc.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="at least 4x4"):
        M.MultiBlockMasking()(3, 8, gen())
    with pytest.raises(ValueError, match="multiples of 2"):
        M.WindowMasking()(5, 8, gen())
    with pytest.raises(ValueError, match="unknown preset 'huge'.*micro"):
        M.JEPAConfig(model="huge")
    with pytest.raises(ValueError, match="unknown masking 'random'.*multiblock"):
        M.make_masking("random")
    with pytest.raises(ValueError, match="unknown feature norm 'rms'.*dyntanh"):
        M.JEPAConfig(feature_norm="rms")
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        M.JEPAConfig(loss="l1")


@pytest.mark.parametrize("norm", M.PREDICTOR_NORMS)
def test_the_predictor_output_norm_is_what_it_says(norm):
    torch.manual_seed(0)
    model = M.IJEPA(M.JEPAConfig(predictor_norm=norm))
    batch = M.mask_images(torch.rand(3, 3, 32, 32), 8, M.make_masking("multiblock"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in model.predictor.out_norm.parameters():  # trainable scale and shift away from 1 and 0
            p.add_(0.5)
        out = model(batch).prediction[batch.is_target]  # (T, 128)
    trainable = sum(p.numel() for p in model.predictor.out_norm.parameters())
    mean, std = out.mean(-1), out.std(-1, unbiased=False)
    if norm in ("free", "layernorm-free"):  # a parameter-free norm last: every prediction has mean 0, std 1
        assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5) and torch.allclose(std, torch.ones_like(std), atol=1e-3)
    else:  # no norm, or a trainable one whose scale and shift move the statistics
        assert not torch.allclose(std, torch.ones_like(std), atol=1e-2)
    assert trainable == {"none": 0, "free": 0, "layernorm": 2 * 128, "layernorm-free": 2 * 128}[norm]
