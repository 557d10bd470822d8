"""Studies and variants beside I-JEPA itself, each file read with the notebook that uses it.

    normalisation.py       loss maps, token energy and the checkerboard (Loss_Maps.ipynb)
    supervised.py          a supervised baseline for the linear probe (Linear_Probe.ipynb)
    ec_ijepa.py            encoder-conditioned I-JEPA (`train.py --condition-encoders`)
    official_checkpoint.py loading a released official checkpoint into models.py's modules
"""
