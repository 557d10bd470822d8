"""The model's sin-cos positions against an independent statement of the official formula.

tests/test_models.py checks `models.sincos_2d` against its own docstring. Here the reference is the
official I-JEPA code's table (facebookresearch/ijepa, src/models/vision_transformer.py,
get_2d_sincos_pos_embed), restated in numpy in its own terms: a square grid made by
np.meshgrid(w, h), the first half of the channels from the grid's first axis and the second half
from its second, each half a 1-D table [sin(pos * omega), cos(pos * omega)] with
omega = 1 / 10000 ** (arange(D/4) / (D/4)). The official model adds row n of that table to the
n-th output of its Conv2d patch embedding, flattened in raster order; an official checkpoint
stores the table as `pos_embed` / `predictor_pos_embed`, which studies/official_checkpoint.py
drops because the model computes its positions. That is right only if the two agree token for token.
"""

import numpy as np
import pytest
import torch

import models as M


def official_sincos_table(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim), the official fixed position table, token n = the n-th patch of a
    raster scan (row-major), as the official code computes it."""
    h = np.arange(grid_size, dtype=float)
    w = np.arange(grid_size, dtype=float)
    grid = np.stack(np.meshgrid(w, h), axis=0).reshape(2, 1, grid_size, grid_size)  # w first

    def one_axis(dim, positions):  # (M,) -> (M, dim): sines, then cosines
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=float) / (dim / 2.0))
        angles = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(embed_dim // 2, grid[0]), one_axis(embed_dim // 2, grid[1])], axis=1)


def test_the_official_table_varies_along_columns_in_its_first_half():
    # what np.meshgrid(w, h) means: the first grid axis holds the column index, so the first half of the
    # channels changes from one column to the next and stays put down a column; the second half the reverse
    table = official_sincos_table(16, 3).reshape(3, 3, 16)  # (row, col, channel)
    first, second = table[..., :8], table[..., 8:]
    assert np.array_equal(first[0], first[2]) and not np.array_equal(first[:, 0], first[:, 2])
    assert np.array_equal(second[:, 0], second[:, 2]) and not np.array_equal(second[0], second[2])
    assert np.array_equal(table[0, 0], np.r_[np.zeros(4), np.ones(4), np.zeros(4), np.ones(4)])  # sin 0, cos 0


# 192 and 384 on 14 x 14: ViT-tiny and its predictor at 224 px, patch 16
@pytest.mark.parametrize("dim, grid", [(16, 5), (64, 7), (192, 14), (384, 14)])
def test_sincos_2d_equals_the_official_table(dim, grid):
    ours = M.sincos_2d(M.grid_coords(grid, grid), dim)
    torch.testing.assert_close(ours, torch.from_numpy(official_sincos_table(dim, grid)).float(), atol=1e-6, rtol=0)


def test_the_encoder_adds_the_official_table_to_its_tokens_in_the_official_order():
    # patch embedding zeroed: what the encoder's embedding adds to each token is its position alone, in the
    # order of the encoder's tokens, which must be the official Conv2d's raster order
    enc = M.VisionTransformer(M.ViTConfig(dim=64, depth=1, heads=4, patch_size=4))
    with torch.no_grad():
        enc.patch_embed.weight.zero_()
        enc.patch_embed.bias.zero_()
        patches, pos, _ = enc.image_tokens(torch.rand(2, 3, 24, 24))
        embedded = enc.embed(patches, pos)
    for image in embedded:
        torch.testing.assert_close(image, torch.from_numpy(official_sincos_table(64, 6)).float(), atol=1e-6, rtol=0)


def test_the_predictor_adds_the_official_rows_to_its_context_and_its_queries():
    # official: predictor_embed(context) + predictor_pos_embed[context's raster indices], and mask token +
    # predictor_pos_embed[targets' raster indices]; the tokens entering the first block are compared
    pred = M.Predictor(M.ViTConfig(dim=32, depth=1, heads=4, patch_size=8), encoder_dim=16).eval()
    g = torch.Generator().manual_seed(0)
    batch = M.mask_images(torch.rand(1, 3, 40, 40), 8, M.MultiBlockMasking(), g)  # a 5 x 5 grid
    seen = []
    pred.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    context = torch.randn(1, batch.context_pos.shape[1], 16)
    with torch.no_grad():
        pred(context, batch.context_pos, batch.context_sample, batch.hidden_pos, batch.hidden_sample)
        table = torch.from_numpy(official_sincos_table(32, 5)).float()
        raster = lambda pos: pos[0, :, 0] * 5 + pos[0, :, 1]  # noqa: E731
        expected = torch.cat([pred.embed(context[0]) + table[raster(batch.context_pos)],
                              pred.mask_token[0, 0] + table[raster(batch.hidden_pos)]])
    torch.testing.assert_close(seen[0][0], expected, atol=1e-6, rtol=0)
