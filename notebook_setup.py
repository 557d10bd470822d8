"""The notebooks' set-up, after their first cell has found the repository and put it on sys.path.

Each notebook opens with the same short cell: it finds the repository root (the first folder, from
the current one upwards, that holds models.py; in Colab, a clone in /content, made from REPO_URL when
there is none), puts it on sys.path and calls `setup(ROOT)`, which does the rest:

  * makes the root the working folder, so relative paths mean what they mean on the command line;
  * installs the packages that are missing in Colab (elsewhere: says what to run);
  * picks the mode. *Quick* under the test command (notebooks/conftest.py sets IJEPA_NOTEBOOK_MODE=
    quick; CI too): the same code on small sizes, writing figures and checkpoints only into a fresh
    folder inside IJEPA_QUICK_DIR (which conftest.py removes when the tests end; the system's
    temporary folder without it). *Full* otherwise: the real sizes, figures into images/ and
    checkpoints into checkpoints/;
  * prints the root and the mode.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

# import name -> pip name: what the notebooks import beyond the standard library and Jupyter
WANTED = {"torch": "torch", "torchvision": "torchvision", "matplotlib": "matplotlib", "sklearn": "scikit-learn",
          "tqdm": "tqdm"}


class Setup(NamedTuple):
    ROOT: Path  # the repository root, also the working folder
    QUICK: bool  # quick mode (the test command) or full mode (a person)
    OUT: Path  # where the notebook writes: a fresh temporary folder in quick mode, ROOT in full mode
    FIGURES: Path  # OUT / "images"
    CHECKPOINTS: Path  # OUT / "checkpoints"
    IN_COLAB: bool


def quick_mode() -> bool:
    """IJEPA_NOTEBOOK_MODE=quick or full; without it, quick under CI and full otherwise."""
    return os.environ.get("IJEPA_NOTEBOOK_MODE", "quick" if os.environ.get("CI") else "full") == "quick"


def install_missing(in_colab: bool) -> None:
    """Install the packages of WANTED that cannot be imported (Colab); elsewhere, say what to run."""
    missing = [pip_name for name, pip_name in WANTED.items() if importlib.util.find_spec(name) is None]
    if missing and in_colab:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
    elif missing:
        raise RuntimeError(f"missing packages {', '.join(missing)}: run pip install -r requirements.txt")


def setup(root) -> Setup:
    """Everything the set-up cell does once the repository is on sys.path; returns the names the
    notebooks use (ROOT, QUICK, OUT, FIGURES, CHECKPOINTS, IN_COLAB)."""
    root = Path(root).resolve()
    in_colab = "google.colab" in sys.modules
    os.chdir(root)
    install_missing(in_colab)
    quick = quick_mode()
    out = Path(tempfile.mkdtemp(prefix="ijepa-quick-", dir=os.environ.get("IJEPA_QUICK_DIR"))) if quick else root
    figures, checkpoints = out / "images", out / "checkpoints"
    figures.mkdir(parents=True, exist_ok=True)
    print(f"repository root: {root}\nmode: {'quick' if quick else 'full'}; figures go to {figures}")
    return Setup(root, quick, out, figures, checkpoints, in_colab)
