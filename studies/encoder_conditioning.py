"""The encoder-conditioning study (Encoder_Conditioning.ipynb): I-JEPA against EC-IJEPA
(studies/ec_ijepa.py), in runs identical but for --condition-encoders.

The probes are the project's (`evaluate.checkpoint_features`, `evaluate.probe_all`,
`evaluate.run_depth`). What this file adds are the paper's two label-free measures of one model,
each with a standard error, so that they can be judged by the project's rule (`evaluation.stats.compare`):

    RankMe of the teacher and of the student   the effective rank of their mean-pooled features of
                                               held-out images (each encoder as it is probed);
    LiDAR of the student                       the effective rank of the LDA matrix whose classes
                                               are images and whose samples are masked views of
                                               them, the student as it sees them in training.

The standard errors come from the bootstrap over images: a rank is no mean of per-image values,
so no formula gives its spread.
"""

import torch

from evaluation.rankme import image_embeddings, lidar, masked_view_embeddings, rankme
from evaluation.stats import bootstrap_se

CONTEXT_SCALES = ((0.85, 1.0), (0.5, 0.7), (0.3, 0.5))  # claim 3: the default range first, then smaller contexts
KEEP_STEPS = (75, 150, 300, 600)  # claim 4: the probed points along a run (and its last step)


def rank_measures(model, images: torch.Tensor, masking, views: int = 8, seed: int = 0, resamples: int = 100) -> dict:
    """RankMe of the teacher and of the student (images (N, C, H, W), normalised as in training;
    N >= D for a full-range value) and LiDAR of the student over `views` masked views of each image
    drawn by `masking` (the training masking: `TrainConfig.make_masking()`), with bootstrap
    standard errors: {"rankme_teacher", "rankme_teacher_se", "rankme_student", ..., "lidar_student_se"}."""
    out = {}
    for name in ("teacher", "student"):
        embeddings = image_embeddings(getattr(model, name), images)  # (N, D); an EC encoder conditions itself
        out[f"rankme_{name}"] = rankme(embeddings)
        out[f"rankme_{name}_se"] = bootstrap_se(rankme, embeddings, resamples, seed)
    per_view = masked_view_embeddings(model, images, masking, views, seed)  # (N, views, D)
    out["lidar_student"] = lidar(per_view)
    out["lidar_student_se"] = bootstrap_se(lidar, per_view, resamples, seed)
    return out
