"""Shared fixtures and the `slow` marker.

`python -m pytest` runs everything (CI does); `python -m pytest -m "not slow"` is the fast loop: the
unit tests, without training runs, runs of the scripts, DDP and the notebooks. Mark a slow test
with `@pytest.mark.slow` in its own file; the hook below also marks, without touching those files:
every notebook (nbval items), every test that uses the trained `tiny_checkpoint`, every test of
SLOW_FILES and the tests named in SLOW_TESTS (until their owners mark them)."""

import os

# Before anything loads torch: torch's OpenMP threads sleep when they wait instead of spinning. On a
# machine whose 2 cores other processes also use, spinning made the fast tests of test_models.py and
# test_packing.py take 105 s instead of 15 s; results do not change. Set OMP_WAIT_POLICY yourself to
# override it. Processes started by the tests (scripts, DDP workers, notebook kernels) inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

SLOW_FILES = {
    "test_train.py",  # training runs, resumes and 2-process DDP, nearly every test
    "test_notebooks.py",  # each test runs a notebook's set-up cell in a fresh interpreter
}
SLOW_TESTS = {  # file -> test names (a name without [...] covers every parametrisation)
    "test_models.py": {
        *(f"test_encoder_shapes_every_preset[{hw}-{preset}]" for hw in ("hw0", "hw1", "hw2")
          for preset in ("tiny", "small", "base")),
        "test_loss_halves_within_100_steps_on_a_fixed_batch", "test_batchnorm_statistics_and_sums_are_over_every_rank",
    },
    "test_packing.py": {
        "test_packed_training_lowers_the_loss_like_unpacked", "test_packed_forward_equals_each_image_alone",
    },
    "test_ec_ijepa.py": {"test_training_lowers_the_loss"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        file = item.path.name
        names = {item.name, getattr(item, "originalname", item.name)}
        if (item.path.suffix == ".ipynb" or file in SLOW_FILES or names & SLOW_TESTS.get(file, set())
                or "tiny_checkpoint" in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A train.py checkpoint of 3 steps (micro, 32 px, 48 scenes), trained once per test session and
    shared by every test that needs a trained checkpoint. Read it; never write into its folder."""
    import train as T
    out = tmp_path_factory.mktemp("tiny-run")
    T.train(T.TrainConfig(steps=3, num_images=48, resolution=32, batch_size=16, out=str(out)), progress=False)
    return str(out / "checkpoint.pt")


def assert_picture(path, size=None, min_colours=8):
    """The PNG at `path` opens, is `size` = (width, height) pixels (when given), and is not one flat
    colour: it has at least `min_colours` distinct colours. Returns the pixels (height, width, channels)."""
    pixels = matplotlib.image.imread(str(path))
    assert size is None or pixels.shape[:2] == (size[1], size[0]), f"{path}: {pixels.shape[1]} x {pixels.shape[0]} px, expected {size}"
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) >= min_colours, f"{path}: only {len(colours)} distinct colours"
    return pixels


@pytest.fixture
def picture():
    """assert_picture, for tests: picture(path, (width, height)) or picture(path)."""
    return assert_picture
