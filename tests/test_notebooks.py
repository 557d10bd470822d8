"""The notebooks' set-up cell: quick mode under the test command, into a temporary folder; full mode
for a person. Each case runs the real first code cell in a fresh interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PROBE = """
import json, runpy, sys
if sys.argv[1] == "under-pytest":
    runpy.run_path("conftest.py")  # what the test command loads before nbval starts a kernel
namespace = {}
exec(sys.stdin.read(), namespace)
print(json.dumps({"quick": namespace["QUICK"], "figures": str(namespace["FIGURES"]),
                  "checkpoints": str(namespace["CHECKPOINTS"]), "root": str(namespace["ROOT"]),
                  "quick_dir": namespace["os"].environ.get("IJEPA_QUICK_DIR")}))
"""


def run_setup_cell(notebook, mode, **env_changes):
    cell = next("".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code")
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
