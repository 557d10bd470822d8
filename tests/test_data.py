"""Tests for data.py: the scene renderer and dataset, normalisation, and the real-data loaders on tiny
files written here in each dataset's exact on-disk format. Run: python -m pytest tests/test_data.py -q"""
import builtins
import pickle
import sys
import warnings

import numpy as np
import pytest
import torch

import data

# ----------------------------------------------------------------------------- the scene renderer


@pytest.mark.parametrize("height,width", [(32, 32), (48, 80), (128, 96)])
def test_render_shapes_dtypes_ranges(height, width):
    out = data.render_scenes(range(6), height, width)
    assert out["image"].shape == (6, 3, height, width) and out["image"].dtype == torch.float32
    assert out["depth"].shape == (6, height, width) and out["depth"].dtype == torch.float32
    assert out["mask"].shape == (6, height, width) and out["mask"].dtype == torch.bool
    assert 0 <= out["image"].min() and out["image"].max() <= 1
    for label in data.LABELS:
        assert out[label].shape == (6,) and out[label].dtype == torch.int64
        assert 0 <= out[label].min() and out[label].max() < data.num_classes(label)
    assert out["mask"].flatten(1).any(1).all(), "the main object is visible in every image"


def test_render_is_deterministic_and_independent_of_the_batch():
    # What the renderer promises: the same call gives the same bits; a scene rendered in another
    # batch agrees within float rounding (elementwise kernels take vector or scalar paths depending
    # on a value's place in the tensor, so other batch shapes round differently on some CPUs), and
    # its labels agree exactly; the main-object mask may flip only where two hits tie within rounding.
    a = data.render_scenes([3, 4, 5, 6], 48, 64, seed=1)
    b = data.render_scenes([3, 4, 5, 6], 48, 64, seed=1)
    alone = data.render_scenes([5], 48, 64, seed=1)
    for key in a:
        assert torch.equal(a[key], b[key])                                  # same shape: bit-exact
    for key in set(a) - {"image", "depth", "mask", "region"}:
        assert torch.equal(a[key][2:3], alone[key])                         # labels: exact
    torch.testing.assert_close(a["image"][2:3], alone["image"], atol=1e-3, rtol=0)   # a quarter of a uint8 level
    torch.testing.assert_close(a["depth"][2:3], alone["depth"], atol=1e-3, rtol=1e-4)
    assert (a["mask"][2:3] != alone["mask"]).float().mean() <= 1e-3
    assert (a["region"][2:3] != alone["region"]).float().mean() <= 1e-3
    assert not torch.equal(a["image"][0], a["image"][1])                   # different index, different image
    other_seed = data.render_scenes([3], 48, 64, seed=2)
    assert not torch.equal(a["image"][0], other_seed["image"][0])


def test_stored_images_agree_whatever_the_chunk_size():
    # SceneDataset renders in chunks and stores uint8: a pixel whose float value sits on a rounding
    # boundary may land one level apart in chunks of another size, never more (tests/README.md, Floating point).
    small, large = data.SceneDataset(40, resolution=32, seed=5, chunk=16), data.SceneDataset(40, resolution=32, seed=5, chunk=40)
    (x, y), (u, v) = small.tensors("count"), large.tensors("count")
    assert torch.equal(y, v)
    levels = ((x - u).abs() * 255).round()
    assert levels.max() <= 1 and (levels > 0).float().mean() < 1e-3


def test_regions_agree_with_the_mask_and_the_depth():
    out = data.render_scenes(range(16), 64, 64)
    region, depth = out["region"], out["depth"]
    assert region.dtype == torch.uint8 and int(region.max()) < len(data.REGIONS)
    assert torch.equal(region == data.REGIONS.index("main object"), out["mask"])
    assert (depth[region == data.REGIONS.index("sky")] == data.SKY_DEPTH).all()    # the sky is infinitely far
    objects = (region >= data.REGIONS.index("main object"))
    assert (depth[objects] < 20).all(), "objects, main or distractor, stand a few units from the camera"
    assert (region == data.REGIONS.index("ground"))[:, -1].float().mean() > 0.5, "the bottom row is mostly ground"
    assert (region == data.REGIONS.index("distractor")).any(), "some scene has a distractor in view"
    assert torch.equal(data.SceneDataset(16).regions(), region)


def test_depth_is_positive_and_consistent_with_the_mask():
    out = data.render_scenes(range(16), 64, 64)
    depth, mask = out["depth"], out["mask"]
    assert (depth > 0).all() and (depth <= data.SKY_DEPTH).all()
    sky = depth == data.SKY_DEPTH   # (and ground further than SKY_DEPTH)
    assert sky.flatten(1).any(1).float().mean() > 0.5, "most cameras see some sky"
    assert (depth[mask] < 20).all(), "main-object pixels are a few units away, far nearer than the sky"
    # a camera looks down on the scene: the bottom row is ground, closer than the top row
    assert (depth[:, -1].mean(1) < depth[:, 0].mean(1)).all()
    # the main object's visible surface is a little nearer than its centre
    scenes = data.sample_scenes(np.arange(16))
    centre = (scenes["bcentre"][:, 0] - scenes["cam"]).norm(dim=-1)
    surface = torch.stack([d[m].median() for d, m in zip(depth, mask)])
    assert ((centre - surface > 0.2) & (centre - surface < 1.5)).all(), centre - surface


def test_labels_are_roughly_balanced():
    scenes = data.sample_scenes(np.arange(4000))  # the layout alone: labels without rendering
    for label in data.LABELS:
        counts = torch.bincount(scenes[label], minlength=data.num_classes(label)).float()
        assert counts.min() > 0.6 * counts.mean(), (label, counts)
    out = data.render_scenes(range(8), 32, 32)
    assert torch.equal(out["distance"], data.sample_scenes(np.arange(8))["distance"])


def test_colour_does_not_give_the_class_away():
    out = data.render_scenes(range(600), 32, 32)
    means = torch.stack([image[:, mask].mean(1) for image, mask in zip(out["image"], out["mask"])])  # (600, 3)
    chroma = means / means.sum(1, keepdim=True)        # colour without brightness (shading differs by shape)
    groups = [chroma[out["shape"] == k] for k in range(len(data.SHAPES))]
    # one-way ANOVA F statistic per channel: between-class over within-class variance. About 1 when
    # the class says nothing about the colour; a class-dependent hue would give hundreds.
    between = sum(len(g) * (g.mean(0) - chroma.mean(0)) ** 2 for g in groups) / (len(groups) - 1)
    within = sum(((g - g.mean(0)) ** 2).sum(0) for g in groups) / (len(chroma) - len(groups))
    assert (between / within < 4).all(), between / within
    per_class = torch.stack([g.mean(0) for g in groups])
    assert (per_class.max(0).values - per_class.min(0).values).max() < 0.06, per_class
    brightness = torch.stack([means[out["shape"] == k].mean() for k in range(len(data.SHAPES))])
    assert brightness.max() - brightness.min() < 0.08, brightness


def test_scene_config_knobs():
    plain = data.SceneConfig(noise=0.0, colour_jitter=0.0, shadows=False, max_distractors=0)
    out = data.render_scenes(range(8), 32, 32, config=plain)
    assert (out["count"] == 0).all() and data.num_classes("count", plain) == 1
    shadowed = data.render_scenes(range(8), 32, 32, config=data.SceneConfig(noise=0.0, colour_jitter=0.0, max_distractors=0))
    assert (shadowed["image"] <= out["image"] + 1e-6).all(), "shadows only darken"
    assert (shadowed["image"] < out["image"] - 0.05).any(), "and there are some"


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="32..256"):
        data.render_scenes([0], 31, 64)
    with pytest.raises(ValueError, match="32..256"):
        data.SceneDataset(10, resolution=(64, 300))
    with pytest.raises(ValueError, match="32..256"):
        data.SceneDataset(10, resolution="64")
    with pytest.raises(ValueError, match="non-negative"):
        data.render_scenes([], 32, 32)
    with pytest.raises(ValueError, match="non-negative"):
        data.render_scenes([3, -1], 32, 32)
    with pytest.raises(ValueError, match="0..4"):
        data.SceneConfig(max_distractors=5)
    with pytest.raises(ValueError, match="positive int"):
        data.SceneDataset(0)
    with pytest.raises(ValueError, match="positive int"):
        data.SceneDataset(-5)
    with pytest.raises(ValueError, match="'train', 'val', 'test'"):
        data.SceneDataset(10, split="training")
    with pytest.raises(ValueError, match="'shape', 'count', 'distance'"):
        data.num_classes("colour")
    with pytest.raises(ValueError, match="'shape', 'count', 'distance'"):
        data.SceneDataset(10, resolution=32).tensors("colour")
    with pytest.raises(ValueError, match="'scenes', 'stl10', 'cifar10', 'nyu'"):
        data.get_dataset("imagenet")
    with pytest.raises(ValueError, match="'train', 'val', 'test'"):
        data.get_dataset("scenes", split="unlabeled")

# ----------------------------------------------------------------------------- the scene dataset


def test_scene_dataset_items_cache_and_tensors():
    ds = data.SceneDataset(40, resolution=(32, 48), seed=3, chunk=16)
    item = ds[17]
    assert set(item) == {"image", "label", "shape", "count", "distance", "depth", "mask", "region"}
    assert item["image"].shape == (3, 32, 48) and item["depth"].shape == (32, 48) and item["mask"].dtype == torch.bool
    assert item["label"] == item["shape"] and isinstance(item["count"], int)
    direct = data.render_scenes([17], 32, 48, seed=3)
    assert (item["image"] - direct["image"][0]).abs().max() <= 0.5 / 255 + 1e-3  # cached as uint8; other batch: rounding
    assert torch.allclose(item["depth"], direct["depth"][0], rtol=2e-3)        # cached as float16
    assert len(ds._cache) == 1 and torch.equal(ds[-1]["image"], ds[39]["image"])
    images, labels = ds.tensors("count")
    assert images.shape == (40, 3, 32, 48) and labels.shape == (40,) and labels.dtype == torch.int64
    assert torch.equal(images[17], item["image"]) and labels[17] == item["count"]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch["image"].shape == (8, 3, 32, 48) and batch["label"].dtype == torch.int64
    with pytest.raises(IndexError):
        ds[40]
    assert data.SceneDataset(10, resolution=np.int64(128)).chunk == 64  # about a million pixels a chunk


def test_splits_are_disjoint():
    images = [data.SceneDataset(32, resolution=32, split=s).tensors()[0] for s in data.SPLITS]
    flat = [x.flatten(1) for x in images]
    for i in range(3):
        for j in range(i + 1, 3):
            assert torch.cdist(flat[i], flat[j]).min() > 1.0  # no image appears in two splits
    assert data.SPLIT_OFFSET["val"] - data.SPLIT_OFFSET["train"] >= 10**9  # and a split holds at most 10**9


def test_normalize_round_trip():
    x = torch.rand(2, 3, 8, 8)
    y = data.normalize(x)
    assert torch.allclose(y.mean((0, 2, 3)), (x.mean((0, 2, 3)) - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD), atol=1e-5)
    assert torch.allclose(data.denormalize(y), x, atol=1e-6)
    assert data.normalize(x[0]).shape == (3, 8, 8)


def test_random_shift_moves_the_image_and_flip_mirrors_it():
    image = torch.zeros(3, 12, 10)
    image[:, 5, 4] = 1.0                                  # one bright pixel
    image[1, :, 0] = 0.5                                  # a left border column, to see the repeat
    shift = data.RandomShiftFlip(shift=2)
    g = torch.Generator().manual_seed(0)
    moves = set()
    for _ in range(200):
        out = shift(image, g)
        assert out.shape == image.shape
        (y, x), = (out[0] == 1.0).nonzero().tolist()    # the pixel is there once, moved by at most 2
        moves.add((y - 5, x - 4))
        content = image[:, max(0, -(y - 5)):12 - max(0, y - 5), max(0, -(x - 4)):10 - max(0, x - 4)]
        assert torch.equal(out[:, max(0, y - 5):12 + min(0, y - 5), max(0, x - 4):10 + min(0, x - 4)], content)
        if x - 4 > 0:                                     # moved right: the border column repeats into the gap
            assert torch.equal(out[:, :, :x - 4], out[:, :, x - 4:x - 3].expand(-1, -1, x - 4))
    assert moves == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}  # all 25 moves happen
    flip = data.RandomShiftFlip(flip=True)
    outs = [flip(image, g) for _ in range(100)]
    assert all(torch.equal(o, image) or torch.equal(o, image.flip(-1)) for o in outs)
    assert 30 < sum(torch.equal(o, image) for o in outs) < 70
    same = data.RandomShiftFlip()
    assert torch.equal(same(image, g), image)
    a, b = (data.RandomShiftFlip(3, True)(image, torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a, b)                              # the generator decides everything
    with pytest.raises(ValueError, match="shift must be 0 or more pixels, got -1"):
        data.RandomShiftFlip(-1)


def test_draw_samples(tmp_path, picture):
    # 4 scenes x 3 rows (image, depth, mask), 1.6-inch panels + margins at 110 dpi: 7.2 x 5.7 inches
    path = data.draw_samples(data.SceneDataset(8, resolution=32), str(tmp_path / "a" / "s.png"), n=4)
    picture(path, (792, 627), min_colours=1000)
    # a batch of 3 wide (48 x 32) scenes: 5.5 x 4.1 inches
    path = data.draw_samples(data.render_scenes(range(3), 32, 48), str(tmp_path / "b.png"))
    picture(path, (605, 451), min_colours=1000)

# ----------------------------------------------------------------------------- real datasets, tiny copies


def _stl10_files(root, n=6, rng=np.random.default_rng(0)):
    """Tiny STL-10 binary files. The images are stored column-major: each channel is written as
    (x, y), which torchvision transposes back to (row, column)."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)        # (N, C, row, column)
    images[0, :, :48] = 0                                                # image 0: top half black
    for name in ("train", "test", "unlabeled"):
        (folder / f"{name}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
    labels = (np.arange(n) % 10 + 1).astype(np.uint8)                   # 1-based on disk
    (folder / "train_y.bin").write_bytes(labels.tobytes())
    (folder / "test_y.bin").write_bytes(labels.tobytes())
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    return images


def test_stl10_from_binary_files(tmp_path, monkeypatch):
    import torchvision
    images = _stl10_files(tmp_path)
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)  # no md5 of the real files
    ds = data.get_dataset("stl10", "train", resolution=96, root=str(tmp_path))
    item = ds[0]
    assert item["image"].shape == (3, 96, 96) and item["label"] == 0
    assert torch.equal((item["image"] * 255).round().byte(), torch.from_numpy(images[0]))  # orientation kept
    assert item["image"][:, :48].max() == 0 and ds[3]["label"] == 3
    unlabeled = data.get_dataset("stl10", "unlabeled", resolution=64, root=str(tmp_path))
    assert len(unlabeled) == 6 and unlabeled[2]["label"] == -1 and unlabeled[2]["image"].shape == (3, 64, 64)
    assert len(data.get_dataset("stl10", "test", resolution=32, root=str(tmp_path), num_images=4)) == 4
    with pytest.raises(ValueError, match="'train', 'test' or 'unlabeled'"):
        data.stl10("val", root=str(tmp_path))


def test_cifar10_from_pickles(tmp_path, monkeypatch):
    import torchvision
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [1, 2, 3, 4]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f)["data"][0].reshape(3, 32, 32)             # rows of R, then G, then B
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    train = data.get_dataset("cifar10", "train", resolution=32, root=str(tmp_path))
    assert len(train) == 20 and train[0]["label"] == 1 and train.classes[0] == "c0"
    assert torch.equal((train[0]["image"] * 255).round().byte(), torch.from_numpy(first))
    test = data.get_dataset("cifar10", "test", resolution=(48, 64), root=str(tmp_path))
    assert len(test) == 4 and test[3]["image"].shape == (3, 48, 64)


def test_missing_datasets_say_how_to_get_them(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_dataset("stl10", root=str(tmp_path))
    assert "stl10_binary" in str(e.value) and "train_X.bin" in str(e.value) and str(tmp_path) in str(e.value)
    assert "torchvision.datasets.STL10(" in str(e.value) and "download=True" in str(e.value)
    with pytest.raises(FileNotFoundError, match="download=True"):  # a FileNotFoundError subclass
        data.get_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nyu_depth_v2_labeled.mat"):
        data.get_dataset("nyu", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.image_folder(str(tmp_path / "nowhere"))


def test_image_folder_modes_small_and_broken_files(tmp_path):
    from PIL import Image
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    Image.new("L", (50, 70), 128).save(tmp_path / "cats" / "grey.png")
    Image.new("RGB", (90, 90), (255, 0, 0)).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "cats" / "palette.png")
    Image.new("CMYK", (100, 80), (0, 255, 255, 0)).save(tmp_path / "dogs" / "cmyk.jpg")
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(tmp_path / "dogs" / "clear.png")  # fully transparent
    Image.new("RGB", (20, 12), (0, 0, 255)).save(tmp_path / "dogs" / "tiny.png")
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "dogs" / "notes.txt").write_text("ignored: not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.image_folder(str(tmp_path), resolution=64)
    messages = [str(w.message) for w in caught]
    assert any("skipped 1 unreadable" in m and "broken.jpg" in m for m in messages), messages
    assert any(m.startswith("2 image(s)") and "upscaled" in m for m in messages), messages  # grey and tiny
    assert len(caught) == 2 and ds.num_skipped == 1 and ds.num_upscaled == 2
    assert len(ds) == 5 and ds.classes == ("cats", "dogs")
    labels = [ds[i]["label"] for i in range(5)]
    assert labels == [0, 0, 1, 1, 1]
    for i in range(5):
        assert ds[i]["image"].shape == (3, 64, 64) and 0 <= ds[i]["image"].min() and ds[i]["image"].max() <= 1
    assert torch.allclose(ds[0]["image"], torch.full((3, 64, 64), 128 / 255), atol=1 / 255)      # grey -> RGB
    assert ds[1]["image"][0].mean() > 0.9 and ds[1]["image"][1:].mean() < 0.1                 # palette red
    assert ds[2]["image"].min() > 0.99                                                        # transparent -> white
    assert ds[3]["image"][0].mean() > 0.9 and ds[3]["image"][1:].mean() < 0.1                 # CMYK red
    assert ds[4]["image"][2].mean() > 0.9                                                     # tiny blue, upscaled


def test_image_folder_empty_or_without_images(tmp_path):
    with pytest.raises(ValueError, match="no images") as e:
        data.image_folder(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=str(tmp_path)):
        data.get_dataset(str(tmp_path))


def test_get_dataset_folder_with_split_subfolders(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        for c in ("x", "y"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / split / c / "im.png")
    ds = data.get_dataset(str(tmp_path), "test", resolution=32)
    assert len(ds) == 2 and ds[1]["label"] == 1
    assert isinstance(data.get_dataset("scenes", "val", resolution=32, num_images=10), data.SceneDataset)


def test_nyu_from_a_tiny_mat_file(tmp_path):
    h5py = pytest.importorskip("h5py")
    n, height, width = 6, 48, 64
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (n, 3, height, width), dtype=np.uint8)
    depths = rng.uniform(0.5, 10, (n, height, width)).astype(np.float32)
    depths[:, :24] = 1.0                                                    # near top half
    with h5py.File(tmp_path / "nyu_depth_v2_labeled.mat", "w") as f:        # MATLAB stores them transposed
        f["images"] = images.transpose(0, 1, 3, 2)
        f["depths"] = depths.transpose(0, 2, 1)
    train = data.get_dataset("nyu", "train", resolution=(48, 64), root=str(tmp_path))
    test = data.get_dataset("nyu", "test", resolution=(48, 64), root=str(tmp_path))
    assert len(train) == 4 and len(test) == 2                               # indices 0 and 5 are test
    item = test[1]
    assert item["label"] == -1 and item["depth"].shape == (48, 64)
    assert torch.equal((item["image"] * 255).round().byte(), torch.from_numpy(images[5]))
    assert torch.allclose(item["depth"], torch.from_numpy(depths[5]))
    assert data.get_dataset("nyu", "train", resolution=32, root=str(tmp_path))[0]["depth"].shape == (32, 32)


def test_nyu_without_h5py_says_pip_install(tmp_path, monkeypatch):
    (tmp_path / "nyu_depth_v2_labeled.mat").write_bytes(b"")
    real_import = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError("No module named 'h5py'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_h5py)
    monkeypatch.delitem(sys.modules, "h5py", raising=False)
    with pytest.raises(ImportError, match="pip install h5py"):
        data.get_dataset("nyu", root=str(tmp_path))


def test_patch_regions_take_the_majority():
    """The one definition of what a patch shows (and so of a main-object patch)."""
    regions = torch.zeros(1, 4, 4, dtype=torch.uint8)  # patches of 2 x 2: four patches
    regions[0, :2, :2] = torch.tensor([[2, 2], [2, 1]])  # patch 0: main object wins 3 to 1
    regions[0, :2, 2:] = torch.tensor([[3, 3], [1, 1]])  # patch 1: a tie, the lower code wins
    regions[0, 2:, :2] = 1
    assert data.patch_regions(regions, 2).tolist() == [[[2, 1], [1, 0]]]


# ---------------------------------------------------------------------------------------------
# the model's side: teacher features, masks, predictions, random init


def test_describe_folder_counts_the_training_images_and_sees_their_size_and_colour(tmp_path):
    from PIL import Image
    for split, n in (("train", 6), ("test", 3)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (28 + i % 2, 30), 40 * i).save(tmp_path / split / c / f"{i}.png")  # 28 or 29 wide
    grey = data.describe_folder(str(tmp_path))
    assert (grey.images, grey.side, grey.greyscale) == (12, 28, True)  # train/ only; median shorter side
    Image.new("RGB", (28, 30), (200, 10, 10)).save(tmp_path / "train" / "a" / "red.png")
    assert not data.describe_folder(str(tmp_path)).greyscale
    (tmp_path / "loose").mkdir()
    Image.new("RGB", (90, 120), (5, 5, 5)).save(tmp_path / "loose" / "x.png")  # grey content in an RGB file
    assert data.describe_folder(str(tmp_path / "loose")) == data.FolderSummary(str(tmp_path / "loose"), 1, 90, True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.describe_folder(str(tmp_path / "empty"))
