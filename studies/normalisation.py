"""The feature-normalisation study (Loss_Maps.ipynb): loss maps, token energy and the checkerboard.

It tests three claims of the feature-normalisation paper on models that differ only in `feature_norm`:
  1. LayerNorm of the teacher's features gives every token the same norm, erasing an "energy
     hierarchy" in which high-energy tokens mark the semantically important regions: measured by
     how well the L2 norm of the teacher's tokens *before* the feature norm picks out the main
     object's patches (ROC AUC), beside where objects usually are (the per-position mean energy)
     and beyond it (energy minus that mean); and whether the targets keep it (the same AUCs of the
     targets' norms, after the feature norm).
  2. Models trained on LayerNorm targets show checkerboard-like artifacts in their loss maps:
     measured on the dataset-mean loss at each patch position, by the contrast between the two
     colours of a checkerboard laid over it, as a z-score against shuffled positions.
  3. DynTanh targets give a longer-tailed loss distribution: the 99th over the 50th percentile of
     the losses, per token and per image.
Beside them, image-level RankMe of the teacher (`evaluation.rankme.image_rankme`).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

import data
import models as M
from evaluation.features import _batched_layers
from evaluation.rankme import image_rankme


@dataclass
class LossMaps:
    """Every predicted token's loss for N images of one resolution, over K masks per image."""

    loss_sum: torch.Tensor  # (N, h, w) float64: each patch's summed loss over the masks that predicted it
    count: torch.Tensor  # (N, h, w) int64: how many of the K masks predicted it (0: never)
    token_loss: torch.Tensor  # (T,) every predicted token's loss, all K masks: the per-token distribution


def scatter_loss_maps(token_loss: torch.Tensor, token_image: torch.Tensor, token_pos: torch.Tensor,
                      n_images: int, grid: tuple) -> tuple:
    """Per-token losses (T,), each token's image (T,) in 0..n_images-1 and its (row, col) (T, 2) ->
    (loss_sum, count), each (n_images, h, w): the summed loss and the number of tokens at each patch.
    A patch predicted by several masks adds up; one never predicted keeps 0 and 0."""
    h, w = grid
    index = (token_image.long() * h + token_pos[:, 0].long()) * w + token_pos[:, 1].long()  # into (N*h*w)
    loss_sum = torch.zeros(n_images * h * w, dtype=torch.float64).index_add_(0, index, token_loss.double())
    count = torch.zeros(n_images * h * w, dtype=torch.long).index_add_(0, index, torch.ones_like(index))
    return loss_sum.view(n_images, h, w), count.view(n_images, h, w)


def mean_loss_map(loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Summed losses and counts (..., h, w) -> the mean loss at each patch (..., h, w); NaN where
    the patch was never predicted (no mask made it a target, so there is no loss to show)."""
    return torch.where(count > 0, loss_sum / count.clamp(min=1), torch.nan)


def dataset_loss_map(loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(N, h, w) -> (h, w): the mean over images of each image's mean loss at that patch position.
    Every image weighs the same; an image that never predicted a position is left out of that
    position's mean (NaN where no image predicted it)."""
    return mean_loss_map(loss_sum, count).nanmean(0)


def image_losses(loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(N, h, w) -> (N,): each image's mean loss over every token predicted in it (all K masks):
    the per-image loss distribution. NaN for an image with no predicted token."""
    total = count.sum((1, 2))
    return torch.where(total > 0, loss_sum.sum((1, 2)) / total.clamp(min=1), torch.nan)


@torch.no_grad()
def loss_maps(model: M.IJEPA, images: torch.Tensor, masking, masks: int = 4, seed: int = 0, batch_size: int = 128,
              normalize=None, progress: bool = False) -> LossMaps:
    """Run a whole I-JEPA (its `forward`: teacher, student, predictor and the loss it trains on)
    over images (N, C, H, W) `masks` times, each time with new masks drawn by `masking` (e.g.
    TrainConfig.make_masking()), and scatter every predicted token's loss to its patch.
    All masks come from one torch.Generator seeded with `seed`, in order (pass, image), so one seed
    gives every model the same masks. `normalize` (e.g. data.normalize) is applied to the images
    first, as in training."""
    p = model.cfg.patch_size
    M.check_images(images, p, model.cfg.in_chans)
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    losses, image_ids, positions = [], [], []
    starts = [(k, start) for k in range(masks) for start in range(0, len(images), batch_size)]
    for _, start in tqdm(starts, desc="loss maps", disable=not progress or len(starts) < 4, mininterval=5):
        x = images[start:start + batch_size]
        batch = M.mask_images(normalize(x) if normalize else x, p, masking, g).to(device)  # masks drawn on the CPU
        out = model(batch)
        losses.append(out.token_loss.float().cpu())
        image_ids.append(out.token_sample.cpu() + start)  # the batch numbers its images from 0
        positions.append(out.token_pos.cpu())
    model.train(was_training)
    token_loss = torch.cat(losses)
    return LossMaps(*scatter_loss_maps(token_loss, torch.cat(image_ids), torch.cat(positions), len(images), grid),
                    token_loss)


def tail_ratio(losses: torch.Tensor, upper: float = 0.99, lower: float = 0.5) -> float:
    """How long the tail of a loss distribution is: its `upper` quantile over its `lower` quantile
    (by default the 99th percentile over the median) of a 1-D tensor of losses; NaNs are left out.
    Quantiles interpolate linearly, as numpy.percentile does by default."""
    if losses.ndim != 1:
        raise ValueError(f"expected a 1-D tensor of losses, got shape {tuple(losses.shape)}")
    x = losses.double()
    x = x[~x.isnan()]
    return float(torch.quantile(x, upper) / torch.quantile(x, lower))


def checker_colours(grid: tuple, cell: int = 1) -> torch.Tensor:
    """(h, w) -> (h, w) bool: one colour of a checkerboard of cell x cell patches, True where
    row // cell + col // cell is odd. cell=1 alternates patch by patch (the artifact of the
    paper); cell=2 alternates 2 x 2 blocks of patches."""
    rows, cols = M.grid_coords(*grid).T
    return ((rows // cell + cols // cell) % 2 == 1).reshape(grid)


def _checker_contrast(values: torch.Tensor, white: torch.Tensor) -> torch.Tensor:
    """Cells' values (..., n) and one colour of the checkerboard (n,) bool -> (...,):
    |mean over white cells - mean over black cells| / std over all cells; 0 for a constant map."""
    w = white.to(values.dtype)
    gap = (values * w).sum(-1) / w.sum() - (values * (1 - w)).sum(-1) / (1 - w).sum()
    std = values.std(-1, unbiased=False)
    constant = std <= 1e-12 * values.abs().amax(-1)  # a spread of rounding errors alone is no spread
    return torch.where(constant, 0.0, gap.abs() / std.clamp(min=1e-300))


def checkerboard_score(loss_map: torch.Tensor, cell: int = 1, permutations: int = 200, seed: int = 0) -> dict:
    """How checkered a map (h, w) is, and how far that is from chance.

    contrast: the gap between the mean values of a checkerboard's two colours (`checker_colours`),
    divided by the map's standard deviation, in absolute value: 0 for a constant map (or any map
    whose colours have equal means), 2 for a perfect +-1 checkerboard. The null: the same statistic
    after shuffling the map's cells (`permutations` seeded shuffles), which keeps every value and
    destroys every spatial pattern; z = (contrast - null_mean) / null_std (0 when the null has no
    spread), p = the share of shuffles at least as checkered (counting the map itself).
    Cells that are NaN (never predicted) are left out. A map with no checkerboard at all (contrast 0)
    scores about z = -1.3, not 0: the null's contrasts are absolute values of a roughly normal gap,
    whose mean is sqrt(2/pi) of its spread and whose standard deviation is sqrt(1 - 2/pi) of it.
    Only a large positive z means "checkered"."""
    colour = checker_colours(tuple(loss_map.shape), cell).flatten()
    values = loss_map.double().flatten()
    finite = values.isfinite()
    values, colour = values[finite], colour[finite]
    if colour.all() or not colour.any():
        raise ValueError("the map's finite cells must include both colours of the checkerboard")
    contrast = float(_checker_contrast(values, colour))
    g = torch.Generator().manual_seed(seed)
    shuffles = torch.rand(permutations, len(values), generator=g, dtype=torch.float64).argsort(1)  # (P, n)
    null = _checker_contrast(values[shuffles], colour)  # (P,)
    null_mean, null_std = float(null.mean()), float(null.std())
    z = (contrast - null_mean) / null_std if null_std > 0 else 0.0
    p = (1 + int((null >= contrast - 1e-12).sum())) / (permutations + 1)
    return {"contrast": contrast, "null_mean": null_mean, "null_std": null_std, "z": z, "p": p, "cell": cell}


@torch.no_grad()
def token_energy(encoder, images: torch.Tensor, batch_size: int = 256, normalize=None, target: str | None = None) -> torch.Tensor:
    """Token energy: images (N, C, H, W) -> the L2 norm of each patch token (N, h, w).

    By default read from the output of the encoder's last block, the last entry of `encode`'s
    per-block list: before the encoder's last layer (`VisionTransformer.norm`: the affine LayerNorm,
    or DynTanh) and so before `M.apply_feature_norm`. After those, LayerNorm would have given every
    token the same norm, which is the claim under test. (With batchnorm and none, the last layer is
    the identity and this is the teacher's output itself.) `target` (a feature norm's name, e.g. the
    model's cfg.feature_norm): the norm of the regression target instead, the encoder's final output
    after `M.apply_feature_norm`, which is what the predictor is trained to match."""
    p = encoder.cfg.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)

    def norms(layers):  # _batched_layers yields [block 1, ..., last block, final output]
        if target is None:
            return layers[-2].float().norm(dim=-1).cpu()
        out = layers[-1].float()
        return M.apply_feature_norm(out, torch.ones(out.shape[:2], dtype=torch.bool), target).norm(dim=-1).cpu()

    batches = _batched_layers(encoder, images, batch_size, normalize, False, lambda t: t)
    return torch.cat([norms(layers) for layers in batches]).reshape(len(images), *grid)


def energy_auc(energy: torch.Tensor, is_object: torch.Tensor, per_image: bool = False) -> float:
    """ROC AUC of token energy (N, h, w) as a score for "this patch shows the main object"
    (is_object (N, h, w) bool): 1 when every object patch has more energy than every other patch,
    0.5 when energy tells nothing, 0 when the order is reversed. Pooled over every patch of every
    image, or (per_image) the mean over the images that have both kinds of patch, which leaves out
    differences of energy between images."""
    # roc_auc_score: ties count half, as in the Mann-Whitney U
    if not per_image:
        return float(roc_auc_score(is_object.flatten().numpy(), energy.flatten().double().numpy()))
    both = [i for i in range(len(energy)) if 0 < int(is_object[i].sum()) < is_object[i].numel()]
    if not both:
        raise ValueError("no image has both main-object and other patches")
    return float(np.mean([roc_auc_score(is_object[i].flatten().numpy(), energy[i].flatten().double().numpy())
                          for i in both]))


def normalisation_study(model: M.IJEPA, images: torch.Tensor, regions: torch.Tensor, masking, masks: int = 4,
                        seed: int = 0, batch_size: int = 128, normalize=None, permutations: int = 200) -> dict:
    """Every measurement of the study for one model, on images (N, C, H, W) of one resolution with
    their region maps (N, H, W) (data.render_scenes' `region`; a patch shows the main object where
    `data.patch_regions` says so): the loss maps over `masks` masks per image (see `loss_maps`), the
    dataset-mean loss map and how checkered it is (patch by patch and in 2 x 2
    blocks), the tail of the loss per token and per image, image-level RankMe of the teacher, and
    token energy with its AUCs for the main object:

    energy_auc: the teacher's token energy before the feature norm, pooled over every patch;
    energy_auc_per_image: the same within each image, averaged;
    position_auc: the per-position mean energy, a score that knows only where objects usually are;
    energy_auc_beyond_position: energy minus that mean: what energy says about *this* image's object;
    target_energy_*: the same for the norms of the regression targets (after the feature norm), with
    their coefficient of variation. When every target has the same norm up to rounding (CV below
    1e-4: LayerNorm) their AUCs are NaN, since rounding errors would rank the patches."""
    maps = loss_maps(model, images, masking, masks, seed, batch_size, normalize)
    loss_map = dataset_loss_map(maps.loss_sum, maps.count)
    is_object = data.patch_regions(regions, model.cfg.patch_size) == data.MAIN_OBJECT
    out = {"maps": maps, "loss_map": loss_map,
           "checkerboard": checkerboard_score(loss_map, 1, permutations, seed),
           "checkerboard_2x2": checkerboard_score(loss_map, 2, permutations, seed),
           "tail_token": tail_ratio(maps.token_loss), "tail_image": tail_ratio(image_losses(maps.loss_sum, maps.count)),
           "rankme": image_rankme(model.teacher, normalize(images) if normalize else images)}
    for name, target in (("energy", None), ("target_energy", model.cfg.feature_norm)):
        energy = token_energy(model.teacher, images, batch_size, normalize, target=target)
        usual = energy.mean(0, keepdim=True).expand_as(energy)  # where energy usually is, not what this image shows
        cv = float(energy.std() / energy.mean())
        flat = cv < 1e-4
        out |= {name: energy, f"{name}_cv": cv,
                f"{name}_auc": math.nan if flat else energy_auc(energy, is_object),
                f"{name}_auc_per_image": math.nan if flat else energy_auc(energy, is_object, per_image=True),
                f"{name}_auc_beyond_position": math.nan if flat else energy_auc(energy - usual, is_object)}
        if name == "energy":
            out["position_auc"] = energy_auc(usual, is_object)
    return out
