"""The test command runs every notebook in quick mode, whatever the environment: nbval starts the
kernels after this file is imported, and they inherit the variables set here. A person who opens a
notebook in Jupyter or Colab gets the full mode.

Quick mode writes only into a temporary folder: each notebook makes its own inside the one folder
created here (IJEPA_QUICK_DIR), and that folder is removed when the test command ends, so that
running the tests again and again does not fill the disk."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("IJEPA_NOTEBOOK_MODE", "quick")
QUICK_DIR = tempfile.mkdtemp(prefix="ijepa-notebooks-")
os.environ["IJEPA_QUICK_DIR"] = QUICK_DIR
atexit.register(shutil.rmtree, QUICK_DIR, ignore_errors=True)
