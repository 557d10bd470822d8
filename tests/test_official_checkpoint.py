"""official_checkpoint.py: a checkpoint in the official layout loads and reproduces the source
model's outputs; truncated, foreign and mismatched files are refused with the reason."""

import pytest
import torch

import models as M
import studies.official_checkpoint as O


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def official_layout(model: M.IJEPA) -> dict:
    """Write our weights in the official checkpoint layout (DESIGN.md §2)."""
    def encoder(enc):
        sd = {}
        for k, v in enc.state_dict().items():
            if k.startswith("patch_embed."):
                k = k.replace("patch_embed.", "patch_embed.proj.")
                v = v.reshape(v.shape[0], 3, 8, 8) if v.ndim == 2 else v
            sd["module." + k] = v.clone()
        sd["module.pos_embed"] = M.sincos_2d(M.grid_coords(4, 4), enc.cfg.dim)[None]
        return sd

    pred = {"module.predictor_" + k if k != "mask_token" else "module.mask_token": v.clone()
            for k, v in model.predictor.state_dict().items()}
    pred["module.predictor_pos_embed"] = torch.zeros(1, 16, model.predictor.cfg.dim)
    return {"encoder": encoder(model.student), "target_encoder": encoder(model.teacher),
            "predictor": pred, "opt": {}, "epoch": 1}


def test_official_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    src = M.IJEPA(M.JEPAConfig())
    with torch.no_grad():
        for p in src.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))  # teacher != student, to catch a wrong source
    path = tmp_path / "official.pth.tar"
    torch.save(official_layout(src), path)

    dst = M.IJEPA(M.JEPAConfig())
    loaded = O.load_official_checkpoint(str(path), dst.teacher, dst.predictor)
    assert loaded == ["target_encoder", "predictor"]
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst.teacher.encode(images), src.teacher.encode(images))
        batch = M.mask_images(images, 8, M.MultiBlockMasking(), gen())
        ctx = src.student(batch.context_patches, batch.context_pos, batch.context_sample)
        args = (ctx, batch.context_pos, batch.context_sample, batch.hidden_pos, batch.hidden_sample)
        assert torch.equal(dst.predictor(*args), src.predictor(*args))


def test_official_checkpoint_errors(tmp_path):
    src = M.IJEPA(M.JEPAConfig())
    path = tmp_path / "ckpt.pth.tar"
    torch.save(official_layout(src), path)
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    enc = M.IJEPA(M.JEPAConfig()).teacher
    with pytest.raises(ValueError, match="truncated.pth.tar"):
        O.load_official_checkpoint(str(truncated), enc)

    sd = official_layout(src)
    sd["target_encoder"]["module.blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight: file \(5, 5\)"):
        O.load_official_checkpoint(sd, enc)

    with pytest.raises(ValueError, match="unknown checkpoint layout.*'model'"):
        O.load_official_checkpoint({"model": {}}, enc)

    bigger = M.IJEPA(M.JEPAConfig(model="tiny")).teacher
    with pytest.raises(ValueError, match="wrong shapes"):
        O.load_official_checkpoint(official_layout(src), bigger)


