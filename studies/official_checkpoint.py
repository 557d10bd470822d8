"""Loading a released official I-JEPA checkpoint into this repository's modules.

Official layout: {"encoder", "predictor", "target_encoder", "opt", ...}, each a state dict whose
keys start with "module." (DDP). Encoder keys equal ours but for the patch embedding (a Conv2d,
here a Linear on flattened patches) and a fixed `pos_embed` table (here positions are computed);
predictor keys carry a "predictor_" prefix.

    encoder = M.VisionTransformer(M.ViTConfig(dim=1280, depth=32, heads=16, patch_size=14))
    load_official_checkpoint("IN1K-vit.h.14-300e.pth.tar", encoder)   # the target encoder
"""

import torch.nn as nn

import models as M
import train as T


def _official_encoder_to_ours(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k == "pos_embed":
            continue  # fixed sin-cos table: computed from coordinates here
        if k == "patch_embed.proj.weight":
            k, v = "patch_embed.weight", v.flatten(1)  # (D, C, p, p) -> (D, C*p*p)
        elif k == "patch_embed.proj.bias":
            k = "patch_embed.bias"
        out[k] = v
    return out


def _official_predictor_to_ours(sd: dict) -> dict:
    return {k.removeprefix("predictor_"): v for k, v in sd.items() if k != "predictor_pos_embed"}


def _load_strict(module: nn.Module, sd: dict, what: str) -> None:
    ours = module.state_dict()
    missing = sorted(set(ours) - set(sd))
    unexpected = sorted(set(sd) - set(ours))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(ours[k].shape)}"
             for k in sorted(set(sd) & set(ours)) if sd[k].shape != ours[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"the checkpoint's {what} does not fit this model: missing keys {missing}, "
                         f"unexpected keys {unexpected}, wrong shapes {wrong}. Build the model with the "
                         f"checkpoint's preset and patch size.")
    module.load_state_dict(sd)


def load_official_checkpoint(source, encoder: M.VisionTransformer, predictor: M.Predictor | None = None) -> list:
    """Load a released official I-JEPA checkpoint (a path or its loaded dict) into `encoder`
    (from `target_encoder`, the EMA teacher that is kept after pre-training) and, when given and
    present, into `predictor`. Returns the names of what was loaded."""
    ckpt = source if isinstance(source, dict) else T.load_checkpoint(source)  # weights_only, errors that say why
    if not isinstance(ckpt, dict) or "target_encoder" not in ckpt:
        keys = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"unknown checkpoint layout: expected the official top-level keys "
                         f"'encoder', 'predictor', 'target_encoder'; found {keys}")

    def strip(sd):
        return {k.removeprefix("module."): v for k, v in sd.items()}

    _load_strict(encoder, _official_encoder_to_ours(strip(ckpt["target_encoder"])), "target_encoder")
    loaded = ["target_encoder"]
    if predictor is not None and "predictor" in ckpt:
        _load_strict(predictor, _official_predictor_to_ours(strip(ckpt["predictor"])), "predictor")
        loaded.append("predictor")
    return loaded
