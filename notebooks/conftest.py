"""The test command runs every notebook in quick mode, whatever the environment: nbval starts the
kernels after this file is imported, and they inherit the variable. A person who opens a notebook
in Jupyter or Colab gets the full mode. Quick mode writes only into a temporary folder."""

import os

os.environ.setdefault("IJEPA_NOTEBOOK_MODE", "quick")
