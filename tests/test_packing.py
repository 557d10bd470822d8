"""Behaviour of packing.py: every image exactly once, static shapes, exact rebuild, packed == alone."""

import pytest
import torch

import data as D
from studies import ec_ijepa
import models as M
import packing as P


def random_images(n, seed, max_side=120):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(24, max_side, (n, 2), generator=g)
    return [(torch.rand(3, int(h), int(w), generator=g), i) for i, (h, w) in enumerate(sizes)]


def pack(images, cfg, masking="window", seed=0):
    return list(P.pack_images(images, cfg, M.make_masking(masking), torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("masking", ["window", "multiblock"])
def test_every_image_exactly_once_static_shapes_and_shared_rows(masking):
    cfg = P.PackingConfig.balanced(M.make_masking(masking), rows=6)
    for trial in range(40):  # hundreds of random mixes of sizes, across trials
        n = 1 + trial * 3 % 47
        batches = pack(random_images(n, trial), cfg, masking, seed=trial)
        labels = torch.cat([b.labels for b in batches])
        assert sorted(labels.tolist()) == list(range(n)), "every image exactly once"
        for b in batches:
            assert b.context_patches.shape == (cfg.rows, cfg.context_len, 3 * 64)
            assert b.hidden_patches.shape == (cfg.rows, cfg.hidden_len, 3 * 64)
            assert b.context_patches.dtype == torch.float32 and b.context_sample.dtype == torch.long
            assert b.images_per_row == cfg.max_images_per_row
            for i in range(len(b.grids)):  # an image's two streams sit in one row
                rows_c = (b.context_sample == i).any(1).nonzero().flatten()
                rows_t = (b.hidden_sample == i).any(1).nonzero().flatten()
                assert len(rows_c) == 1 and torch.equal(rows_c, rows_t)


def test_rebuilding_each_image_from_its_tokens_is_exact():
    cfg = P.PackingConfig.balanced(M.WindowMasking(), rows=4)
    images = random_images(40, 1)
    g = torch.Generator().manual_seed(0)
    splits = [P.prepare(x, cfg, M.WindowMasking(), g, y) for x, y in images]
    resized = {}
    g = torch.Generator().manual_seed(0)
    for x, y in images:  # the same draws again, to know each resized image
        size = P.random_size(x.shape[1], x.shape[2], cfg, g)
        resized[y] = P.resize(x, size)
        M.WindowMasking()(size[0] // 8, size[1] // 8, g)
    packer = P.Packer(cfg)
    batches = [b for s in splits for b in packer.add(s)] + packer.flush()
    n = 0
    for b in batches:
        for label, image in zip(b.labels.tolist(), P.rebuild_images(b, cfg.patch_size)):
            assert torch.equal(image, resized[label])
            n += 1
    assert n == 40


def test_random_size_keeps_aspect_caps_area_and_rounds():
    cfg = P.PackingConfig(side_range=(32, 128), max_area=64 * 96)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        h, w = P.random_size(300, 200, cfg, g)
        assert h % 16 == 0 and w % 16 == 0 and min(h, w) >= 32
        assert h * w <= 64 * 96
        assert abs(h - 1.5 * w) <= 2 * 16  # aspect kept up to rounding each side to a 16-px window
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [P.random_size(100, 70, cfg, g1) for _ in range(20)] == [P.random_size(100, 70, cfg, g2) for _ in range(20)]


@pytest.mark.slow
def test_packed_forward_equals_each_image_alone():
    torch.manual_seed(0)
    for model_class in (M.IJEPA, ec_ijepa.ConditionedIJEPA):  # conditioning tokens are per image too
        model = model_class(M.JEPAConfig()).eval()
        cfg = P.PackingConfig.balanced(M.WindowMasking(), rows=2)
        g = torch.Generator().manual_seed(0)
        splits = [P.prepare(x, cfg, M.WindowMasking(), g, y) for x, y in random_images(7, 3)]
        packer = P.Packer(cfg)
        batches = [b for s in splits for b in packer.add(s)] + packer.flush()
        with torch.no_grad():
            for b in batches:
                out = model(b)
                assert torch.unique(b.context_sample[b.context_sample >= 0]).tolist() == list(range(len(b.labels)))
                for i, label in enumerate(b.labels.tolist()):
                    alone = model(M.MaskedBatch.padded([splits[label]]))
                    mine = out.token_sample == i
                    torch.testing.assert_close(out.token_loss[mine], alone.token_loss, atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(out.prediction[out.is_target][mine], alone.prediction[alone.is_target], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_packed_training_lowers_the_loss_like_unpacked():
    images = [(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)), i) for i in range(24)]
    cfg = P.PackingConfig(side_range=(32, 32), max_area=32 * 32, rows=4, context_len=48, hidden_len=80)
    g = torch.Generator().manual_seed(0)
    splits = [P.prepare(x, cfg, M.WindowMasking(), g, y) for x, y in images]
    packer = P.Packer(cfg)
    packed = [b for s in splits for b in packer.add(s)] + packer.flush()
    unpacked = [M.MaskedBatch.padded(splits[i:i + 8]) for i in range(0, 24, 8)]

    def train(batches):
        torch.manual_seed(0)
        model = M.IJEPA(M.JEPAConfig())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def total():
            with torch.no_grad():
                return sum(model(b).token_loss.sum() for b in batches) / sum(int(b.is_target.sum()) for b in batches)

        before = total()
        for step in range(25):
            for b in batches:
                loss = model(b).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                model.update_teacher(0.996)
        return before, total()

    (p0, p1), (u0, u1) = train(packed), train(unpacked)
    torch.testing.assert_close(p0, u0, atol=1e-5, rtol=1e-5)  # same images, same masks, same loss
    assert p1 < 0.7 * p0 and u1 < 0.7 * u0
    assert abs(float(p1 - u1)) < 0.25 * float(u0)


def test_dataloader_workers_reproducible_and_complete():
    data = [torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(i)) for i in range(50)]
    data = [(x, i) for i, x in enumerate(data)]
    cfg = P.PackingConfig.balanced(M.WindowMasking(), rows=4)

    def run():
        return list(P.BatchStream(data, M.WindowMasking(), 8, cfg, seed=3, workers=2))

    a, b = run(), run()
    labels = torch.cat([x.labels for x in a])
    assert sorted(labels.tolist()) == list(range(50))
    assert len(a) == len(b) and all(torch.equal(x.context_patches, y.context_patches) for x, y in zip(a, b))
    stream = P.BatchStream(data, M.WindowMasking(), 8, cfg, seed=3, workers=2)
    stream.set_epoch(1)
    other = list(stream)
    assert not torch.equal(other[0].context_patches, a[0].context_patches)


@pytest.mark.parametrize("packed", [False, True], ids=["batches", "packed"])
def test_batches_do_not_depend_on_the_number_of_workers(packed):
    # 7 groups of 8 images: the workers end unevenly, and the batches still come out in order
    data = [(torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(i)), i) for i in range(50)]
    cfg = P.PackingConfig.balanced(M.WindowMasking(), rows=4) if packed else None

    def run(workers):
        stream = P.BatchStream(data, M.WindowMasking(), 8, cfg, batch_size=8, seed=3, workers=workers,
                               augment=D.RandomShiftFlip(4, True))
        stream.set_epoch(1)
        return list(stream)

    alone = run(0)
    assert sorted(torch.cat([b.labels for b in alone]).tolist()) == list(range(50))
    for workers in (1, 2):
        batches = run(workers)
        assert len(batches) == len(alone)
        for a, b in zip(alone, batches):
            assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("context_patches", "context_pos",
                       "context_sample", "hidden_patches", "hidden_sample", "is_target", "labels"))


@pytest.mark.parametrize("workers", [0, 1])
def test_iterating_a_stream_leaves_torchs_global_generator_alone(workers):
    # a resumed run starts iterating mid-epoch: the model's random draws must not depend on when
    data = [(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)), i) for i in range(20)]
    stream = P.BatchStream(data, M.WindowMasking(), 8, None, batch_size=8, seed=3, workers=workers)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert len(list(stream)) == 3
    assert torch.equal(torch.rand(3), expected)


def test_augmented_stream_is_reproducible_and_changes_only_the_images():
    data = [(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)), i) for i in range(20)]

    def batches(augment):
        return list(P.BatchStream(data, M.MultiBlockMasking(), 8, None, batch_size=10, seed=2, augment=augment))

    plain, a, b = batches(None), batches(D.RandomShiftFlip(4, True)), batches(D.RandomShiftFlip(4, True))
    assert all(torch.equal(x.context_patches, y.context_patches) for x, y in zip(a, b))   # seeded
    assert not all(torch.equal(x.context_patches, y.context_patches) for x, y in zip(plain, a))
    assert all(torch.equal(x.labels, y.labels) for x, y in zip(plain, a))            # same images, same order


def test_unpacked_stream_sharded_over_ranks_covers_each_image_once():
    data = [(torch.rand(3, 32, 32), i) for i in range(23)]
    seen = []
    for rank in range(2):
        batches = list(P.BatchStream(data, M.MultiBlockMasking(), 8, None, batch_size=5, seed=1, rank=rank, world=2,
                                     workers=2))
        assert all(b.context_patches.shape[0] <= 5 for b in batches)
        seen += torch.cat([b.labels for b in batches]).tolist()
    assert sorted(seen) == list(range(23))


def test_too_large_image_is_refused_or_resized():
    cfg = P.PackingConfig(side_range=(96, 96), max_area=96 * 96, rows=2, context_len=20, hidden_len=40)
    with pytest.raises(ValueError, match="more than a row holds.*fit='resize'"):
        pack([torch.rand(3, 96, 96)], cfg)
    cfg = P.PackingConfig(side_range=(96, 96), max_area=96 * 96, rows=2, context_len=20, hidden_len=40, fit="resize")
    batches = pack([(torch.rand(3, 96, 96), 0)], cfg)
    assert len(batches) == 1 and batches[0].labels.tolist() == [0]
    assert int(batches[0].grids.prod()) <= 60


def test_bad_configs_say_what_to_change():
    with pytest.raises(ValueError, match="cannot hold even the smallest image"):
        P.PackingConfig(context_len=4, hidden_len=4)
    with pytest.raises(ValueError, match="cannot hold one 16-px window"):
        P.PackingConfig(side_range=(8, 12), min_side=16)
    with pytest.raises(ValueError, match="rows must be at least 1"):
        P.PackingConfig(rows=0)
    with pytest.raises(ValueError, match="max_images_per_row must be at least 1, got 0"):
        P.PackingConfig(max_images_per_row=0)


def test_drawings(tmp_path, picture):
    cfg = P.PackingConfig.balanced(M.WindowMasking(), rows=4)
    batch = pack(random_images(20, 0), cfg)[0]
    assert P.token_picture(batch.context_sample).shape == (4, cfg.context_len, 3)
    P.draw_packed_batch(batch, tmp_path / "packed.png")
    P.draw_attention_mask(batch, 0, tmp_path / "mask.png")
    picture(tmp_path / "packed.png", (1440, 324))
    picture(tmp_path / "mask.png", (720, 720))
