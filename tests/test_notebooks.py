"""The notebooks' set-up cell: quick mode under the test command, into a temporary folder; full mode
for a person. Each case runs the real first code cell in a fresh interpreter. Every notebook opens
with the same cell, and notebook_setup.setup, which it calls, puts quick paths inside
IJEPA_QUICK_DIR and full paths inside the repository."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import notebook_setup

pytestmark = pytest.mark.slow  # each test runs a notebook's set-up cell in a fresh interpreter

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PROBE = """
import json, os, runpy, sys
if sys.argv[1] == "under-pytest":
    runpy.run_path("conftest.py")  # what the test command loads before nbval starts a kernel
namespace = {}
exec(sys.stdin.read(), namespace)
print(json.dumps({"quick": namespace["QUICK"], "figures": str(namespace["FIGURES"]),
                  "checkpoints": str(namespace["CHECKPOINTS"]), "root": str(namespace["ROOT"]),
                  "quick_dir": os.environ.get("IJEPA_QUICK_DIR")}))
"""


def setup_cell(notebook):
    return next("".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code")


def run_setup_cell(notebook, mode, **env_changes):
    cell = setup_cell(notebook)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "IJEPA_NOTEBOOK_MODE", "IJEPA_QUICK_DIR")}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], input=cell, capture_output=True, text=True,
                         cwd=ROOT / "notebooks", env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"Self_Supervised_Learning.ipynb", "Sequence_Packing.ipynb"}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_test_command_runs_notebooks_quick_into_a_temporary_folder(notebook):
    got = run_setup_cell(notebook, "under-pytest")  # no CI in the environment
    assert got["quick"] and Path(got["root"]) == ROOT
    for key in ("figures", "checkpoints"):
        assert ROOT not in Path(got[key]).parents, f"quick mode writes {key} into the repository: {got[key]}"
        assert Path(got["quick_dir"]) in Path(got[key]).parents, f"{key} outside the test command's folder"
    assert not Path(got["quick_dir"]).exists(), "the test command leaves its quick-mode folder behind"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_person_gets_the_full_mode_and_ci_the_quick_one(notebook, tmp_path):
    got = run_setup_cell(notebook, "by-hand")
    assert not got["quick"] and Path(got["figures"]) == ROOT / "images" and Path(got["checkpoints"]) == ROOT / "checkpoints"
    got = run_setup_cell(notebook, "by-hand", CI="true", IJEPA_QUICK_DIR=str(tmp_path))  # its folder inside pytest's
    assert got["quick"] and tmp_path in Path(got["figures"]).parents


def test_every_notebook_opens_with_the_same_short_set_up_cell():
    cells = {setup_cell(notebook) for notebook in NOTEBOOKS}
    assert len(cells) == 1, "the notebooks' set-up cells differ"
    (cell,) = cells
    assert "from notebook_setup import setup" in cell and len(cell.splitlines()) <= 30


def test_setup_puts_quick_paths_in_the_quick_folder_and_full_paths_in_the_repository(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # setup changes the working folder; monkeypatch puts it back
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("IJEPA_QUICK_DIR", str(tmp_path))
    monkeypatch.setenv("IJEPA_NOTEBOOK_MODE", "quick")
    quick = notebook_setup.setup(ROOT)
    assert quick.QUICK and quick.ROOT == ROOT and Path.cwd() == ROOT and not quick.IN_COLAB
    assert quick.OUT.parent == tmp_path and quick.FIGURES.is_dir()
    assert (quick.FIGURES, quick.CHECKPOINTS) == (quick.OUT / "images", quick.OUT / "checkpoints")
    assert notebook_setup.setup(ROOT).OUT != quick.OUT  # a fresh folder each time
    monkeypatch.setenv("IJEPA_NOTEBOOK_MODE", "full")
    full = notebook_setup.setup(ROOT)
    assert not full.QUICK and full.OUT == ROOT
    assert (full.FIGURES, full.CHECKPOINTS) == (ROOT / "images", ROOT / "checkpoints")
    monkeypatch.delenv("IJEPA_NOTEBOOK_MODE")
    monkeypatch.setenv("CI", "true")
    assert notebook_setup.setup(ROOT).QUICK
