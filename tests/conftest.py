"""Shared fixtures and the `slow` marker.

`python -m pytest` runs everything (CI does); `python -m pytest -m "not slow"` is the fast loop: the
unit tests, without training runs, runs of the scripts, DDP and the notebooks. Mark a slow test
with `@pytest.mark.slow` in its own file; the hook below marks every notebook (nbval items) and
every test that uses the trained `tiny_checkpoint`."""

import os

# Before anything loads torch: torch's OpenMP threads sleep when they wait instead of spinning. On a
# machine whose 2 cores other processes also use, spinning made the fast tests of test_models.py and
# test_packing.py take 105 s instead of 15 s; results do not change. Set OMP_WAIT_POLICY yourself to
# override it. Processes started by the tests (scripts, DDP workers, notebook kernels) inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

def pytest_collection_modifyitems(config, items):
    """Every notebook and every test that uses the trained `tiny_checkpoint` is slow; other slow
    tests carry @pytest.mark.slow (or `pytestmark`) in their own file."""
    for item in items:
        if item.path.suffix == ".ipynb" or "tiny_checkpoint" in getattr(item, "fixturenames", ()):
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
