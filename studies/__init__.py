"""Studies and variants beside I-JEPA itself, each file read with the notebook that uses it.

    normalisation.py       loss maps, token energy and the checkerboard (Loss_Maps.ipynb)
    supervised.py          a supervised baseline for the linear probe (Linear_Probe.ipynb)
    ec_ijepa.py            encoder-conditioned I-JEPA (`train.py --condition-encoders`)
    mae.py                 MAE on the same backbone: pixels of random patches (`train.py --method mae`)
    sigreg.py              a JEPA without teacher, kept from collapse by SIGReg (`train.py --method sigreg`)
    collapse.py            reading collapse in training logs, and the equal-width controls of concat-4 (Failure_Modes.ipynb)
    official_checkpoint.py loading a released official checkpoint into models.py's modules
"""
