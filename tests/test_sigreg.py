"""SIGReg on inputs whose answer is known: the Epps-Pulley statistic of a standard normal sample,
of a collapsed one and of an anisotropic one, against the integrals they should give."""

import math

import pytest
import torch

import studies.sigreg as SR


def integral(f, lo=-SR.T_MAX, hi=SR.T_MAX, n=200_001):
    # a direct, fine trapezoid over [lo, hi]: the reference the 17-point grid is checked against
    t = torch.linspace(lo, hi, n, dtype=torch.float64)
    return float(torch.trapezoid(f(t), t))


def test_the_grid_integrates_even_functions_over_the_real_line():
    t, w = SR.trapezoid_weights()
    assert t[0] == 0 and t[-1] == SR.T_MAX and len(t) == SR.T_POINTS
    gauss = torch.exp(-t ** 2 / 2)
    # the Gaussian weight alone: integral over [-3, 3] of exp(-t^2 / 2) = sqrt(2 pi) erf(3 / sqrt 2)
    assert float(w @ gauss) == pytest.approx(math.sqrt(2 * math.pi) * math.erf(3 / math.sqrt(2)), rel=2e-3)


def test_a_standard_normal_sample_scores_its_sampling_noise_whatever_its_size():
    # E|phi_N(t) - phi(t)|^2 = (1 - exp(-t^2)) / N for N(0, 1) samples, so E[EP] = the integral below
    expected = integral(lambda t: (1 - torch.exp(-t ** 2)) * torch.exp(-t ** 2 / 2))  # about 1.05
    g = torch.Generator().manual_seed(0)
    for n in (200, 2000):
        scores = SR.epps_pulley(torch.randn(n, 400, generator=g))  # 400 independent samples of size n
        assert scores.mean().item() == pytest.approx(expected, rel=0.08)


def test_a_collapsed_sample_scores_in_proportion_to_its_size():
    expected = integral(lambda t: (1 - torch.exp(-t ** 2 / 2)) ** 2 * torch.exp(-t ** 2 / 2))  # about 0.40
    for n in (100, 1000):
        assert SR.epps_pulley(torch.zeros(n, 3)).tolist() == pytest.approx([n * expected] * 3, rel=3e-3)


def test_sigreg_prefers_an_isotropic_gaussian_to_an_anisotropic_one_and_ignores_the_order():
    g = torch.Generator().manual_seed(1)
    directions = SR.random_directions(16, 64, g)
    assert torch.allclose(directions.norm(dim=0), torch.ones(64))
    isotropic = torch.randn(2000, 16, generator=g)
    anisotropic = isotropic * torch.linspace(0.1, 2.0, 16)  # the same sample, stretched per axis
    shifted = isotropic + 1.0  # the right covariance, the wrong mean
    score = SR.sigreg(isotropic, directions)
    assert score < 2.0 < 10 * 2.0 < SR.sigreg(anisotropic, directions) and SR.sigreg(shifted, directions) > 20
    shuffled = isotropic[torch.randperm(2000, generator=g)]
    assert torch.allclose(SR.sigreg(shuffled, directions), score, rtol=1e-4)


def test_rows_left_out_do_not_count_even_when_they_hold_nan():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 5, generator=g)
    padded = torch.cat([x, torch.full((7, 5), float("nan"))])
    valid = torch.arange(307) < 300
    assert torch.allclose(SR.epps_pulley(padded, valid), SR.epps_pulley(x))


def test_the_gradient_pulls_a_collapsed_batch_apart():
    x = (0.01 * torch.randn(500, 8, generator=torch.Generator().manual_seed(3))).requires_grad_()
    directions = SR.random_directions(8, 32, torch.Generator().manual_seed(4))
    before = SR.sigreg(x, directions)
    before.backward()
    with torch.no_grad():
        spread = x - 0.5 * x.grad / x.grad.norm() * x.norm()  # one small step down the gradient
    assert spread.std() > x.std() and SR.sigreg(spread, directions) < before


def test_the_sigreg_jepa_predicts_its_own_features_and_its_loss_is_the_weighted_sum():
    import models as M

    torch.manual_seed(0)
    model = SR.SIGRegJEPA(M.JEPAConfig(), weight=0.1, slices=32)
    batch = M.mask_images(torch.rand(4, 3, 32, 32), 8, M.make_masking("multiblock"), torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    out = model(batch)
    # the targets are the student's own tokens over the whole image, after the feature norm
    whole = model.student(*batch.whole_images())
    torch.testing.assert_close(out.teacher_features, model.teacher_targets(whole, batch))
    parts = out.parts
    torch.testing.assert_close(out.loss, 0.9 * parts["prediction"] + 0.1 * parts["sigreg"])
    # SIGReg of every real token along the directions the forward drew (from the global generator)
    torch.set_rng_state(state)
    directions = SR.random_directions(128, 32)
    valid = (batch.whole_images()[2] >= 0).reshape(-1)
    torch.testing.assert_close(parts["sigreg"], SR.sigreg(whole.reshape(-1, 128), directions, valid).detach())


def test_without_sigreg_the_targets_pass_gradients_to_the_student():
    import models as M

    torch.manual_seed(0)
    model = SR.SIGRegJEPA(M.JEPAConfig(), weight=0.0)
    batch = M.mask_images(torch.rand(4, 3, 32, 32), 8, M.make_masking("multiblock"), torch.Generator().manual_seed(0))
    out = model(batch)
    assert out.teacher_features.requires_grad  # no stop-gradient: the targets are part of the graph
    out.loss.backward()
    # the teacher slot takes no gradient; the student gets it through both the context and the targets
    assert all(p.grad is None for p in model.teacher.parameters())
    grad_both = model.student.patch_embed.weight.grad.clone()
    model.zero_grad()
    model.loss(model.predict(model.encode_context(batch), batch), out.teacher_features.detach(), batch).loss.backward()
    assert not torch.allclose(model.student.patch_embed.weight.grad, grad_both)
