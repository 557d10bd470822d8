"""studies/supervised.py: fine-tuning trains only the last block, the norm and a head, leaves the
encoder it was given alone, and learns an easy label."""

import pytest
import torch

import models as M
import studies.supervised as SV


def easy_images(n, seed):
    # two classes an encoder can tell apart at once: dark and bright images
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(2, (n,), generator=g)
    x = 0.2 * torch.rand(n, 3, 32, 32, generator=g) + 0.15 + 0.5 * y[:, None, None, None]
    return x, y


def test_fine_tuning_trains_the_last_block_alone_and_learns(monkeypatch):
    torch.manual_seed(0)
    encoder = M.VisionTransformer(M.ViTConfig(patch_size=8, dim=32, depth=3, heads=4))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    seen, real = {}, SV.fit_classifier

    def keep(tuned, *args, **kwargs):  # the real loop, keeping the encoder it trains
        seen["tuned"] = tuned
        return real(tuned, *args, **kwargs)

    monkeypatch.setattr(SV, "fit_classifier", keep)
    (x, y), (x_test, y_test) = easy_images(256, 1), easy_images(128, 2)
    top1, steps = SV.fine_tune_last_block(encoder, x, y, x_test, y_test, classes=2, steps=30, batch=32, lr=3e-3)
    assert steps == 30 and top1 > 0.9
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())  # the given encoder is untouched
    tuned = seen["tuned"].state_dict()
    changed = {k for k in tuned if not torch.equal(tuned[k], before[k])}
    assert changed and all(k.startswith(("blocks.2.", "norm.")) for k in changed)


def test_fit_classifier_needs_one_budget():
    encoder = M.VisionTransformer(M.ViTConfig(patch_size=8, dim=32, depth=1, heads=4))
    x, y = easy_images(8, 0)
    with pytest.raises(ValueError, match="one of minutes and steps"):
        SV.fit_classifier(encoder, x, y, x, y, 2)
