"""studies/encoder_conditioning.py: the bootstrap on a statistic whose standard error is known, and
the rank measures of a model against their direct computation."""

import math

import pytest
import torch

import evaluation.rankme as RM
import models as M
import studies.ec_ijepa as EC
import studies.encoder_conditioning as S


def test_bootstrap_se_of_a_mean_is_the_formula():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(400, generator=g, dtype=torch.float64)
    expected = float(values.std()) / math.sqrt(len(values))  # about 0.05
    assert S.bootstrap_se(lambda v: float(v.mean()), values, resamples=400) == pytest.approx(expected, rel=0.15)
    assert S.bootstrap_se(lambda v: float(v.mean()), torch.ones(50), resamples=20) == 0.0  # no spread, no error
    with pytest.raises(ValueError, match="at least 2 rows"):
        S.bootstrap_se(lambda v: 0.0, torch.ones(1))


@pytest.mark.parametrize("conditioned", [False, True], ids=["ijepa", "ec-ijepa"])
def test_rank_measures_are_rankme_and_lidar_of_the_model_as_probed_and_trained(conditioned):
    torch.manual_seed(0)
    model = (EC.ConditionedIJEPA if conditioned else M.IJEPA)(M.JEPAConfig(model="micro"))
    images = torch.rand(24, 3, 32, 32)
    masking = M.make_masking("multiblock")
    got = S.rank_measures(model, images, masking, views=3, seed=2, resamples=10)
    assert got["rankme_teacher"] == pytest.approx(RM.image_rankme(model.teacher, images), rel=1e-5)
    assert got["rankme_student"] == pytest.approx(RM.image_rankme(model.student, images), rel=1e-5)
    views = RM.masked_view_embeddings(model, images, masking, views=3, seed=2)
    assert got["lidar_student"] == pytest.approx(RM.lidar(views), rel=1e-5)
    assert all(got[f"{k}_se"] > 0 for k in ("rankme_teacher", "rankme_student", "lidar_student"))
    assert 1 <= got["lidar_student"] <= model.student.cfg.dim and model.training
