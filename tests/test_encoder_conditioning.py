"""studies/encoder_conditioning.py: the rank measures of a model against their direct computation."""

import pytest
import torch

import evaluation.rankme as RM
import models as M
import studies.ec_ijepa as EC
import studies.encoder_conditioning as S


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
