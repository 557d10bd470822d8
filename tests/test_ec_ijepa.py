"""ec_ijepa.py: pooled position tokens on hand-made inputs, one pooling for training and inference,
no leak between images, and the probe's encode is the conditioned one."""

import pytest
import torch

import studies.ec_ijepa as EC
import evaluation.features as EF
import models as M


def test_position_tokens_pool_runs_of_each_image_on_a_hand_made_row():
    # one row: image 0 has 4 tokens (3 valid), image 1 has 2 (both valid), then padding
    pos = torch.tensor([[[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [0, 0]]])
    sample = torch.tensor([[5, 5, 5, 5, 6, 6, -1]])  # ids continue from an earlier row
    valid = torch.tensor([[True, False, True, True, True, True, False]])
    D = 8
    tokens, ids = EC.position_tokens(pos, valid, sample, images_per_row=2, dim=D)
    P = EC.POOLED_TOKENS
    assert tokens.shape == (1, 2 * P, D) and ids.shape == (1, 2 * P)
    emb = M.sincos_2d(pos[0], D)
    # fewer valid tokens than slots: one token per run, in stream order
    torch.testing.assert_close(tokens[0, 0], emb[0])
    torch.testing.assert_close(tokens[0, 1], emb[2])
    torch.testing.assert_close(tokens[0, 2], emb[3])
    torch.testing.assert_close(tokens[0, P], emb[4])
    torch.testing.assert_close(tokens[0, P + 1], emb[5])
    assert ids[0].tolist() == [5, 5, 5] + [-1] * (P - 3) + [6, 6] + [-1] * (P - 2)


def test_pooling_slots_cut_each_image_into_runs_of_ceil_n_over_8():
    # one row: image 0 has 10 valid tokens (runs of 2: slots 0..4), image 1 has 3 valid tokens
    # between two that are not (runs of 1: slots 8, 9, 10), then padding
    sample = torch.tensor([[0] * 10 + [1] * 5 + [-1, -1]])
    valid = torch.tensor([[True] * 10 + [False, True, True, True, False] + [False, False]])
    slot = EC.pooling_slots(valid, sample, images_per_row=2)
    assert slot[valid].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 8, 9, 10]


def test_position_tokens_average_runs_of_ceil_n_over_8():
    h, w = 5, 4  # 20 tokens -> runs of 3: slots hold 3, 3, 3, 3, 3, 3, 2 tokens
    pos = M.grid_coords(h, w)[None]
    sample = torch.zeros(1, h * w, dtype=torch.long)
    tokens, ids = EC.position_tokens(pos, torch.ones_like(sample, dtype=torch.bool), sample, 1, 16)
    emb = M.sincos_2d(pos[0], 16)
    for k in range(7):
        torch.testing.assert_close(tokens[0, k], emb[3 * k:3 * k + 3].mean(0))
    assert ids[0].tolist() == [0] * 7 + [-1]


def test_inference_conditions_on_every_position_as_training_does():
    torch.manual_seed(0)
    model = EC.ConditionedIJEPA(M.JEPAConfig())
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        conditioned = model.teacher.encode(images)
        patches, pos, sample = model.teacher.image_tokens(images)
        plain = M.VisionTransformer.forward(model.teacher, patches, pos, sample)
        by_hand = model.teacher(patches, pos, sample, *EC.position_tokens(pos, sample >= 0, sample, 1, 128))
    torch.testing.assert_close(conditioned, by_hand)
    assert not torch.allclose(conditioned, plain, atol=1e-4)
    # the probe's features come from the conditioned encode
    layers = EF.layer_features(model.teacher, images)
    torch.testing.assert_close(torch.from_numpy(layers[-1]), conditioned.mean(1))


def test_no_leak_between_images_of_a_row():
    torch.manual_seed(0)
    model = EC.ConditionedIJEPA(M.JEPAConfig())
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    b = torch.rand(3, 32, 32)

    def row(a):
        sa, sb = (M.split_image(x, 8, M.MultiBlockMasking(), g(i)) for i, x in ((1, a), (2, b)))
        return M.MaskedBatch.from_rows([[sa, sb]], len(sa.context_pos) + len(sb.context_pos) + 3,
                                       len(sa.hidden_pos) + len(sb.hidden_pos) + 3, images_per_row=2)

    with torch.no_grad():
        out1, out2 = model(row(torch.rand(3, 32, 32))), model(row(torch.rand(3, 32, 32)))
    keep = out1.token_sample == 1  # image b: same pixels, same masks
    torch.testing.assert_close(out1.token_loss[keep], out2.token_loss[keep], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = EC.ConditionedIJEPA(M.JEPAConfig())
    batch = M.mask_images(torch.rand(8, 3, 32, 32), 8, M.MultiBlockMasking(), torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_teacher(0.996)
        losses.append(float(out.loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


@pytest.mark.parametrize("feature_norm", ["layernorm", "dyntanh"])
def test_teacher_gets_no_gradient(feature_norm):
    model = EC.ConditionedIJEPA(M.JEPAConfig(feature_norm=feature_norm))
    batch = M.mask_images(torch.rand(2, 3, 32, 32), 8, M.MultiBlockMasking(), torch.Generator().manual_seed(0))
    model(batch).loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.blocks[0].attn.qkv.weight.grad is not None
