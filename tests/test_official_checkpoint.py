"""studies/official_checkpoint.py against the official checkpoint layout.

The fake checkpoint is built from tests/official_keys_vit_tiny.json, the official key names and
shapes written from the official code's module structure (not from this repository's mapping),
filled with seeded random values and, for the fixed position tables, the official formula. Loaded
into our ViT-tiny teacher and predictor, it must reproduce what the official forward computes from
the same state dicts, written here from the official module structure (Conv2d patch embedding +
pos_embed, pre-norm blocks, final norm; the predictor's embed, mask tokens, blocks, norm and
projection). Truncated, foreign and mismatched files are refused with the reason."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models as M
import studies.official_checkpoint as O
from test_official_formulas import official_sincos_table

KEYS = json.loads((Path(__file__).parent / "official_keys_vit_tiny.json").read_text())
CFG = KEYS["config"]
GRID = CFG["crop_size"] // CFG["patch_size"]
POSITION_TABLES = {"module.pos_embed", "module.predictor_pos_embed"}  # fixed tables, computed by our model


def official_checkpoint(seed=0) -> dict:
    """A checkpoint with exactly the official keys and shapes: seeded random weights (LayerNorm scales
    near 1), the official sin-cos tables, and every part (encoder, target encoder, predictor) different."""
    g = torch.Generator().manual_seed(seed)
    ckpt = {}
    for part, keys in KEYS["state_dicts"].items():
        sd = {}
        for key, shape in keys:
            if key in POSITION_TABLES:
                sd[key] = torch.from_numpy(official_sincos_table(shape[-1], GRID)).float()[None]
            elif "norm" in key.rsplit(".", 2)[-2] and key.endswith(".weight"):
                sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
            else:
                sd[key] = 0.05 * torch.randn(shape, generator=g)
        ckpt[part] = sd
    return {**ckpt, "opt": {}, "scaler": None, "epoch": 300, "loss": 0.1, "batch_size": 128, "world_size": 16, "lr": 1e-3}


def our_tiny():
    return M.IJEPA(M.JEPAConfig(model="tiny", patch_size=CFG["patch_size"], predictor_dim=CFG["pred_emb_dim"],
                                predictor_depth=CFG["pred_depth"]))


def our_tiny_encoder_config():
    return M.JEPAConfig(model="tiny", patch_size=CFG["patch_size"]).encoder_config()


@pytest.fixture(scope="module")
def official():
    """One fake official checkpoint for the module; a test that changes it changes a copy."""
    return official_checkpoint()


@pytest.fixture(scope="module")
def loaded(official):
    """Our ViT-tiny teacher and predictor after loading the fake official checkpoint (from a file)."""
    model = our_tiny()
    path = Path(tempfile.mkdtemp()) / "IN1K-vit.t.16.pth.tar"
    try:
        torch.save(official, path)
        assert O.load_official_checkpoint(str(path), model.teacher, model.predictor) == ["target_encoder", "predictor"]
    finally:
        shutil.rmtree(path.parent)
    return model


# the official forward, from the official module structure, on the state dicts as they are saved

def _layer_norm(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _official_block(x, sd, name, heads):
    B, N, C = x.shape
    qkv = _linear(_layer_norm(x, sd, f"{name}.norm1"), sd, f"{name}.attn.qkv")
    q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
    x = x + _linear((attn @ v).transpose(1, 2).reshape(B, N, C), sd, f"{name}.attn.proj")
    hidden = F.gelu(_linear(_layer_norm(x, sd, f"{name}.norm2"), sd, f"{name}.mlp.fc1"))
    return x + _linear(hidden, sd, f"{name}.mlp.fc2")


def official_encoder(sd, images):
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=CFG["patch_size"])
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    for i in range(CFG["depth"]):
        x = _official_block(x, sd, f"blocks.{i}", CFG["num_heads"])
    return _layer_norm(x, sd, "norm")


def official_predictor(sd, context, context_index, target_index):
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    pos = sd["predictor_pos_embed"][0]
    x = _linear(context, sd, "predictor_embed") + pos[context_index]
    queries = sd["mask_token"][0] + pos[target_index]
    x = torch.cat([x, queries[None]], dim=1)
    for i in range(CFG["pred_depth"]):
        x = _official_block(x, sd, f"predictor_blocks.{i}", CFG["num_heads"])
    return _linear(_layer_norm(x, sd, "predictor_norm")[:, context.shape[1]:], sd, "predictor_proj")


def test_the_committed_keys_are_the_official_checkpoint_layout():
    assert set(KEYS["top_level_keys"]) >= {"encoder", "predictor", "target_encoder"}
    for part, keys in KEYS["state_dicts"].items():
        assert all(k.startswith("module.") for k, _ in keys) and len({k for k, _ in keys}) == len(keys)
    assert KEYS["state_dicts"]["encoder"] == KEYS["state_dicts"]["target_encoder"]  # a deep copy of the encoder


def test_an_official_checkpoint_fills_every_parameter_and_uses_every_key(official, loaded):
    ckpt, model = official, loaded
    for part, module in (("target_encoder", model.teacher), ("predictor", model.predictor)):
        file = {k: v for k, v in ckpt[part].items() if k not in POSITION_TABLES}
        ours = module.state_dict()
        # every file tensor lands in exactly one of our parameters, unchanged but for the Conv2d -> Linear
        # flattening, and every parameter of ours receives one of them (the random values are all distinct)
        sources = {name: [k for k, v in file.items() if v.numel() == t.numel() and torch.equal(v.flatten(), t.flatten())]
                   for name, t in ours.items()}
        assert all(len(found) == 1 for found in sources.values()), {n: f for n, f in sources.items() if len(f) != 1}
        assert sorted(f[0] for f in sources.values()) == sorted(file), f"{part}: file keys left unused"
    # the position tables that the loader drops are the ones the model computes
    teacher_pos = M.sincos_2d(M.grid_coords(GRID, GRID), CFG["embed_dim"])
    torch.testing.assert_close(ckpt["target_encoder"]["module.pos_embed"][0], teacher_pos, atol=1e-6, rtol=0)
    predictor_pos = M.sincos_2d(M.grid_coords(GRID, GRID), CFG["pred_emb_dim"])
    torch.testing.assert_close(ckpt["predictor"]["module.predictor_pos_embed"][0], predictor_pos, atol=1e-6, rtol=0)


def test_a_loaded_official_checkpoint_computes_what_the_official_model_computes(official, loaded):
    ckpt, model = official, loaded
    images = torch.rand(2, 3, CFG["crop_size"], CFG["crop_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        official = official_encoder(ckpt["target_encoder"], images)  # the target encoder, not the context encoder
        torch.testing.assert_close(model.teacher.encode(images), official, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(official_encoder(ckpt["encoder"], images), official, atol=1e-2)

        batch = M.mask_images(images[:1], CFG["patch_size"], M.MultiBlockMasking(), torch.Generator().manual_seed(0))
        raster = lambda pos: pos[0, :, 0] * GRID + pos[0, :, 1]  # noqa: E731
        context = official[:1, raster(batch.context_pos)]  # the target encoder's tokens stand in for the context's
        expected = official_predictor(ckpt["predictor"], context, raster(batch.context_pos), raster(batch.hidden_pos))
        got = model.predictor(context, batch.context_pos, batch.context_sample, batch.hidden_pos, batch.hidden_sample)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_official_checkpoint_errors(official, tmp_path):
    small = {"target_encoder": {k: v for k, v in official["target_encoder"].items() if ".blocks." not in f".{k}"
                                or k.startswith("module.blocks.0.")}}  # one block: a small file to cut short
    path = tmp_path / "ckpt.pth.tar"
    torch.save(small, path)
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    enc = M.VisionTransformer(our_tiny_encoder_config())
    with pytest.raises(ValueError, match="truncated.pth.tar"):
        O.load_official_checkpoint(str(truncated), enc)

    changed = {**official["target_encoder"], "module.blocks.0.attn.qkv.weight": torch.zeros(5, 5)}
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight: file \(5, 5\)"):
        O.load_official_checkpoint({**official, "target_encoder": changed}, enc)

    changed = {k: v for k, v in official["target_encoder"].items() if k != "module.norm.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['norm\.bias'\]"):
        O.load_official_checkpoint({**official, "target_encoder": changed}, enc)

    with pytest.raises(ValueError, match="unknown checkpoint layout.*'model'"):
        O.load_official_checkpoint({"model": {}}, enc)

    smaller = M.VisionTransformer(M.JEPAConfig(model="micro", patch_size=CFG["patch_size"]).encoder_config())
    with pytest.raises(ValueError, match="wrong shapes"):
        O.load_official_checkpoint(official, smaller)
