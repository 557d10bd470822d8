"""How a frozen encoder is measured, one concern per file; `evaluate.py` puts them together for a
checkpoint and is the command line.

    features.py   the mean-pooled (or grid-pooled) tokens of every layer, and a cache of them
    logistic.py   the linear probe's solver: logistic regression with C chosen on validation
    probes.py     the classification protocol: every layer, concat-4, and k-NN
    depth.py      the depth probe and its metrics
    rankme.py     RankMe (which train.py logs) and LiDAR: label-free effective ranks
    attention.py  attention maps: each block's attention weights, recomputed, and their distance
    stats.py      standard errors, and `compare`: the one rule of every verdict (beyond 2 s.e.)
"""
