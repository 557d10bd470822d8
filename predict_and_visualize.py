"""What does the predictor predict? `python predict_and_visualize.py` makes it visible and measures it.

I-JEPA's predictor outputs features, not pixels, so its predictions need a way back to something a
person can look at. Held-out images are masked with the training masking, the student encodes the
context and the predictor predicts every target. Three views, each measured:

  1. retrieval: every prediction fetches the gallery patch whose teacher feature is cosine-nearest,
     and that patch's pixels are pasted at the target;
  2. a pixel decoder: a small per-token decoder, trained on the *teacher's* features of training
     images and their true pixels (never on a prediction), applied to the predictions;
  3. PCA colours: teacher and predicted features projected on the same 3 principal components.

Every number is given for the trained model, for the same network at its initial weights, and
for a baseline that knows only where a target is (the mean teacher feature at that position):
what the context explains is what the trained model adds over that baseline.

    python predict_and_visualize.py                                # the reference model (else the demo)
    python predict_and_visualize.py --checkpoint checkpoints/demo/checkpoint.pt --json predictions.json
    python predict_and_visualize.py --dataset path/to/folder --num-images 200 --gallery-size 200

Read top to bottom: 1. teacher features of whole images, 2. masks and predictions, 3. retrieval,
4. the position-only baseline, 5. the pixel decoder, 6. the metrics, 7. PCA colours, 8. figures,
9. the whole run and the command line.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import evaluate as E
from evaluation.features import final_tokens
from evaluation.stats import mean_and_se
import models as M
import train as T

# Defaults, sized so that a run of the micro model at 64 px takes about a minute on 2 CPU cores
# (the two decoders are the largest share). 300 held-out images give ~9,500 predicted tokens (multi-
# block masking, 8 x 8 patches), enough for standard errors under 0.01 on the accuracies; 300
# gallery images are ~19,000 patches to search, so a top-1 hit by chance is about 1 in 19,000.
NUM_IMAGES = 300  # held-out images whose targets are predicted and measured
GALLERY_SIZE = 300  # held-out images whose patches are retrieved from
TRAIN_IMAGES = 2000  # training images: the position-only baseline and the decoder's training set
DECODER_STEPS = 2000  # decoder steps of 512 tokens each (~8 passes over 2,000 images of 64 tokens)
DECODER_HIDDEN = 256  # the decoder's hidden width; 0 for a linear decoder
FIGURE_ROWS = 8  # images drawn in each figure
TOP_K = 5  # retrieval accuracy is reported at 1 and at this k
MODELS = ("trained", "random_init", "position_only")

# -----------------------------------------------------------------------------------------------
# 1. Teacher features of whole images, patch by patch


@dataclass
class Patches:
    """Every patch of N images of h x w patches, in raster order (index = row * w + col)."""

    features: torch.Tensor  # (N, T, D) teacher features after the feature norm: the training targets
    pixels: torch.Tensor  # (N, T, C*p*p) each patch's pixels in [0, 1], flattened as M.patchify does
    regions: torch.Tensor | None  # (N, T) each patch's majority region, an index into data.REGIONS (scenes only)
    ids: torch.Tensor  # (N,) which image: a prediction never retrieves a patch of an image with its own id
    grid: tuple  # (h, w)

    def first(self, n: int) -> "Patches":
        return Patches(self.features[:n], self.pixels[:n], None if self.regions is None else self.regions[:n],
                       self.ids[:n], self.grid)


@torch.no_grad()
def teacher_targets(model: M.IJEPA, images: torch.Tensor, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """The regression targets of whole images: images (N, C, H, W) in [0, 1] -> (N, h*w, D).

    The teacher's final tokens (what `evaluate` extracts from any encoder) followed by the feature
    norm that `IJEPA.teacher_targets` applies, i.e. what `IJEPA.encode_targets` gives at every
    patch when the whole image is hidden. Per token (layernorm, dyntanh, none) this equals the
    loss's targets exactly (a test checks it); for batchnorm the statistics come from every token
    of `images` instead of a training batch's targets."""
    tokens = final_tokens(model.teacher, images, batch_size, data.normalize, progress)  # (N, T, D)
    return M.apply_feature_norm(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool), model.cfg.feature_norm)


def teacher_patches(model: M.IJEPA, images: torch.Tensor, regions=None, ids=None, batch_size: int = 256,
                    progress: bool = False) -> Patches:
    """Teacher features, pixels (and regions) of every patch of images (N, C, H, W) in [0, 1]."""
    p = model.cfg.patch_size
    check_image_size(*images.shape[-2:], p)
    M.check_images(images, p, model.cfg.in_chans)
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    return Patches(features=teacher_targets(model, images, batch_size, progress), pixels=M.patchify(images, p),
                   regions=None if regions is None else data.patch_regions(regions, p).flatten(1),
                   ids=torch.arange(len(images)) if ids is None else ids, grid=grid)


def check_image_size(height: int, width: int, patch_size: int) -> None:
    """A one-line error for images smaller than one patch (models.check_images checks the rest: the
    shape, and sides that are multiples of the patch size)."""
    if height < patch_size or width < patch_size:
        raise ValueError(f"images of {height}x{width} pixels are smaller than one {patch_size}x{patch_size} patch of "
                         f"this model: use images of at least {4 * patch_size}x{4 * patch_size} (the multi-block "
                         f"masking needs 4x4 patches)")


# -----------------------------------------------------------------------------------------------
# 2. Masks and predictions


class KeptMasks:
    """A masking, unchanged (the same draws, so the same masks), that keeps every Mask it returns:
    the figure draws each target block (Mask.blocks) apart."""

    def __init__(self, masking):
        self.masking, self.masks = masking, []

    def __call__(self, h: int, w: int, g: torch.Generator) -> M.Mask:
        mask = self.masking(h, w, g)
        self.masks.append(mask)
        return mask


@dataclass
class Predicted:
    """Predictions at every target of N images, flat over the Q targets of all of them."""

    features: torch.Tensor  # (Q, D) the predictor's outputs
    image: torch.Tensor  # (Q,) the image of each target, 0..N-1
    index: torch.Tensor  # (Q,) its patch's raster index in that image
    context: torch.Tensor  # (N, T) bool: the patches the student saw
    blocks: list | None  # per image, its target blocks as (T,) bool tensors (multi-block masking), else None
    grid: tuple  # (h, w)

    def is_target(self) -> torch.Tensor:  # (N, T) bool
        target = torch.zeros_like(self.context)
        target[self.image, self.index] = True
        return target


@torch.no_grad()
def mask_and_predict(model: M.IJEPA, images: torch.Tensor, masking, seed: int = 0, batch_size: int = 128,
                     progress: bool = False) -> Predicted:
    """Mask images (N, C, H, W) in [0, 1] with `masking` (M.make_masking's), drawing from a
    torch.Generator seeded with `seed`, so one seed gives the same masks to every model; encode each
    context with the student and predict every target with the predictor (the model's own stages
    2 and 3, so a variant such as ec_ijepa's is run as it trains)."""
    p = model.cfg.patch_size
    check_image_size(*images.shape[-2:], p)
    h, w = images.shape[-2] // p, images.shape[-1] // p
    masking, g = KeptMasks(masking), torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    features, image, index, context = [], [], [], torch.zeros(len(images), h * w, dtype=torch.bool)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="predict", disable=not progress or len(starts) < 4, mininterval=5):
        batch = M.mask_images(data.normalize(images[start:start + batch_size]), p, masking, g)
        prediction = model.predict(model.encode_context(batch), batch)  # (B, Lh, D)
        target = batch.is_target  # (B, Lh)
        features.append(prediction[target].float().cpu())
        image.append(batch.hidden_sample[target] + start)
        index.append(batch.hidden_pos[target][:, 0] * w + batch.hidden_pos[target][:, 1])
        seen = batch.context_sample >= 0  # (B, Lc) real context tokens
        context[batch.context_sample[seen] + start, batch.context_pos[seen][:, 0] * w + batch.context_pos[seen][:, 1]] = True
    model.train(was_training)
    blocks = None
    if any(mask.blocks for mask in masking.masks):  # multi-block masking: each block as a (T,) bool map
        blocks = [[torch.zeros(h * w, dtype=torch.bool).index_fill_(0, b, True) for b in mask.blocks]
                  for mask in masking.masks]
    return Predicted(torch.cat(features), torch.cat(image), torch.cat(index), context, blocks, (h, w))


# -----------------------------------------------------------------------------------------------
# 3. Retrieval
#
# Similarity is the cosine. With the default layernorm feature norm every target token has the same
# norm, and the predictor regresses them: an uncertain prediction shrinks towards the mean of what
# it cannot tell apart, so its norm says how sure it is, not what it predicts. The direction is
# what to compare.


@torch.no_grad()
def retrieve(queries: torch.Tensor, gallery: torch.Tensor, k: int = TOP_K, query_image=None, gallery_image=None,
             chunk: int = 1024, progress: bool = False) -> tuple:
    """The k gallery items most cosine-similar to each query, best first.

    queries (Q, D), gallery (G, D) -> similarity (Q, k), index (Q, k) into the gallery. Given
    query_image (Q,) and gallery_image (G,), a query never gets an item of its own image (those score
    -inf, so with fewer than k other items the last columns are -inf)."""
    q, gal = F.normalize(queries.float(), dim=1), F.normalize(gallery.float(), dim=1)
    k = min(k, len(gal))
    similarity, index = [], []
    starts = range(0, len(q), chunk)
    for start in tqdm(starts, desc="retrieve", disable=not progress or len(starts) < 4, mininterval=5):
        sim = q[start:start + chunk] @ gal.T  # (chunk, G): a chunk at a time keeps memory at chunk x G
        if query_image is not None:
            sim.masked_fill_(query_image[start:start + chunk, None] == gallery_image[None, :], float("-inf"))
        s, i = sim.topk(k, dim=1)
        similarity.append(s)
        index.append(i)
    return torch.cat(similarity), torch.cat(index)


@torch.no_grad()
def true_patch_rank(predicted: Predicted, own: Patches, gallery_similarity: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each prediction, the number of candidates at least as cosine-similar to it as its true
    patch, when the gallery also holds the prediction's own image: 0 means the true patch comes
    first, < k that it is among the top k (ties count against it).

    own: the Patches of the predicted images (predicted.image indexes them). gallery_similarity
    (Q, k): each prediction's k best similarities in the gallery without its own image (`retrieve`);
    the own image's other patches are counted here. A count from the gallery stops at k, which is
    all that top-k accuracy needs; so one search serves both galleries."""
    rank = []
    for start in range(0, len(predicted.features), chunk):
        sl = slice(start, start + chunk)
        p = F.normalize(predicted.features[sl].float(), dim=1)  # (q, D)
        candidates = F.normalize(own.features[predicted.image[sl]].float(), dim=2)  # (q, T, D): its own image
        sim = torch.einsum("qd,qtd->qt", p, candidates)  # (q, T)
        true = sim.gather(1, predicted.index[sl, None])  # (q, 1)
        # >= counts the true patch itself once: subtract it
        rank.append((sim >= true).sum(1) - 1 + (gallery_similarity[sl] >= true).sum(1))
    return torch.cat(rank)


# -----------------------------------------------------------------------------------------------
# 4. The position-only baseline


def position_mean_features(train_features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The prediction that knows only where a target is: train_features (N, T, D) of training images,
    index (Q,) raster positions -> (Q, D), the mean feature at each position over the training images."""
    return train_features.double().mean(0).float()[index]


def position_only_prediction(train: Patches, predicted: Predicted) -> Predicted:
    """`predicted` with every feature replaced by the position-only baseline's (same targets, same masks)."""
    return dataclasses.replace(predicted, features=position_mean_features(train.features, predicted.index))


# -----------------------------------------------------------------------------------------------
# 5. A pixel decoder on frozen features


class PixelDecoder(nn.Module):
    """Per token: a feature (D,) -> its patch's pixels (C*p*p,), in [0, 1] units. The feature is first
    standardised with fixed statistics of the training features; then a linear map (hidden=0) or a
    one-hidden-layer MLP. It sees one token at a time, so all it shows is in that token."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, out_dim: int, hidden: int = DECODER_HIDDEN):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        d = mean.numel()
        self.net = nn.Linear(d, out_dim) if hidden == 0 else \
            nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, features):  # (..., D) -> (..., C*p*p)
        return self.net((features - self.mean) / self.std)


def train_pixel_decoder(features: torch.Tensor, pixels: torch.Tensor, hidden: int = DECODER_HIDDEN,
                        steps: int = DECODER_STEPS, batch_size: int = 512, lr: float = 2e-3, seed: int = 0,
                        progress: bool = False) -> tuple:
    """Fit a PixelDecoder to pairs of features (n, D) and true patch pixels (n, C*p*p) by mean squared
    error: AdamW, random batches, cosine learning rate. Returns (decoder in eval mode, the loss of
    every step). Feed it teacher features only: then what it does with a prediction is an honest
    test, as it never saw one."""
    features, pixels = features.float(), pixels.float()
    std = features.std(0).clamp(min=1e-6)
    with torch.random.fork_rng(devices=[]):  # its own initial weights, the caller's random state untouched
        torch.manual_seed(seed)
        decoder = PixelDecoder(features.mean(0), std, pixels.shape[1], hidden)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in tqdm(range(steps), desc="pixel decoder", disable=not progress, mininterval=5):
        for group in opt.param_groups:
            group["lr"] = T.cosine(step / steps, lr, 0.0)
        idx = torch.randint(len(features), (batch_size,), generator=g)
        loss = F.mse_loss(decoder(features[idx]), pixels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return decoder.eval(), losses


# -----------------------------------------------------------------------------------------------
# 6. The metrics, per image


@dataclass
class Measured:
    per_image: dict  # metric -> (N,) its value on each predicted image (a mean over the image's targets)
    retrieved: torch.Tensor  # (Q,) flat gallery index (image * T + patch) of each prediction's nearest patch, own image excluded
    decoded: torch.Tensor | None  # (Q, C*p*p) the decoder's pixels for each prediction


def per_image_mean(values: torch.Tensor, image: torch.Tensor, n: int) -> torch.Tensor:
    """Per-token values (Q,) -> (n,) the mean over each image's tokens."""
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, image, values.double())
    return total / torch.bincount(image, minlength=n).clamp(min=1)


@torch.no_grad()
def prediction_metrics(predicted: Predicted, queries: Patches, gallery: Patches, decoder=None, k: int = TOP_K,
                       progress: bool = False) -> Measured:
    """Every number of one model, per image of `queries` (the predicted images; predicted.image
    indexes them). Gallery patches of an image with a query's own id are never retrieved for it.

      top1, top{k}  the true patch is the nearest (among the k nearest) when the gallery also holds
                    the query's own image
      same_region   the nearest patch, own image excluded, shows the same kind of region (sky, ground,
                    main object, distractor) as the true patch; only where both have region maps
      cosine        cosine similarity between the prediction and the true teacher feature
      pixel_mse     mean squared error of the decoder's pixels for the prediction, in [0, 1] units
    """
    T = gallery.features.shape[1]
    gallery_image = gallery.ids.repeat_interleave(T)  # (G*T,) each gallery patch's image id
    similarity, index = retrieve(predicted.features, gallery.features.flatten(0, 1), k,
                                 queries.ids[predicted.image], gallery_image, progress=progress)
    rank = true_patch_rank(predicted, queries, similarity)
    true = queries.features[predicted.image, predicted.index]  # (Q, D)
    per_token = {"top1": rank < 1, f"top{k}": rank < k}
    if queries.regions is not None and gallery.regions is not None:
        per_token["same_region"] = gallery.regions.flatten()[index[:, 0]] == queries.regions[predicted.image, predicted.index]
    per_token["cosine"] = F.cosine_similarity(predicted.features, true, dim=1)
    decoded = None
    if decoder is not None:
        decoded = decoder(predicted.features).clamp(0, 1)  # (Q, C*p*p), clamped to what a picture shows
        per_token["pixel_mse"] = ((decoded - queries.pixels[predicted.image, predicted.index]) ** 2).mean(1)
    n = len(queries.features)
    per_image = {name: per_image_mean(v, predicted.image, n) for name, v in per_token.items()}
    return Measured(per_image, index[:, 0], decoded)


def summarise(measured: Measured) -> dict:
    return {name: mean_and_se(v) for name, v in measured.per_image.items()}


def paired_difference(a: Measured, b: Measured) -> dict:
    """a - b per metric, with the standard error of the per-image differences (the same images and
    masks for both, so the pairing removes what the images have in common)."""
    return {name: mean_and_se(a.per_image[name] - b.per_image[name]) for name in a.per_image if name in b.per_image}


# -----------------------------------------------------------------------------------------------
# 7. PCA colours


def pca_colours(fit_features: torch.Tensor, *features: torch.Tensor) -> list:
    """Colours from the first 3 principal components of fit_features (n, D): each of `features`
    (..., D) -> (..., 3) in [0, 1]. Every input is projected on the same components and each component's
    1st..99th percentile over the fit features is mapped to 0..1, so one colour means one direction.
    Signs are fixed (the largest loading positive), so a rerun gives the same colours."""
    fit = fit_features.double()
    mean = fit.mean(0)
    _, vectors = torch.linalg.eigh((fit - mean).T @ (fit - mean) / len(fit))  # ascending eigenvalues
    axes = vectors[:, -3:].flip(1)  # (D, 3), largest first
    axes = axes * axes.gather(0, axes.abs().argmax(0, keepdim=True)).sign()
    projected = (fit - mean) @ axes  # (n, 3)
    lo, hi = projected.quantile(0.01, dim=0), projected.quantile(0.99, dim=0)
    scale = (hi - lo).clamp(min=1e-12)
    return [(((f.double() - mean) @ axes - lo) / scale).clamp(0, 1).float() for f in features]


# -----------------------------------------------------------------------------------------------
# 8. Figures


def _picture(patches: torch.Tensor, grid: tuple):
    """(T, C*p*p) -> (H, W, C) numpy, for imshow."""
    p = int(round((patches.shape[1] // 3) ** 0.5))
    return M.unpatchify(patches[None].float(), grid, p)[0].permute(1, 2, 0).clamp(0, 1).numpy()


TARGET_GREY, UNUSED_GREY = 0.35, 0.8  # targets darker than the patches nobody uses


def masked_patches(pixels: torch.Tensor, context: torch.Tensor, target: torch.Tensor, fill=None, where=None) -> torch.Tensor:
    """One image's patches (T, C*p*p) with the context kept, targets dark grey, unused patches light grey;
    then fill (T, C*p*p) pasted where `where` (T,) bool."""
    out = torch.where(context[:, None], pixels, torch.where(target[:, None], TARGET_GREY, UNUSED_GREY))
    if fill is not None:
        out = torch.where(where[:, None], fill, out)
    return out


def _outline(ax, block: torch.Tensor, grid: tuple, patch: int, colour="yellow"):
    from matplotlib.patches import Rectangle
    rows, cols = block.reshape(grid).nonzero(as_tuple=True)
    top, left = int(rows.min()) * patch - 0.5, int(cols.min()) * patch - 0.5
    height, width = (int(rows.max()) + 1) * patch - top - 0.5, (int(cols.max()) + 1) * patch - left - 0.5
    ax.add_patch(Rectangle((left, top), width, height, fill=False, edgecolor=colour, linewidth=1.2))


def _new_figure(rows: int, cols: int, panel: float = 1.35):
    from matplotlib.figure import Figure  # no pyplot: the same in scripts, tests and notebooks
    fig = Figure(figsize=(cols * panel + 0.3, rows * panel + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    return fig, axes


def _save(fig, path):
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def draw_predictions(queries: Patches, predicted: Predicted, gallery: Patches, retrieved: torch.Tensor, path=None,
                     rows: int = FIGURE_ROWS, title: str = ""):
    """Retrieval, one row per image: original | context only | each target block filled with its
    retrieved patches | all targets filled. retrieved (Q,): flat gallery index of each prediction's
    nearest patch (Measured.retrieved)."""
    rows = min(rows, len(queries.features))
    p = int(round((queries.pixels.shape[2] // 3) ** 0.5))
    blocks = predicted.blocks or [[] for _ in range(rows)]
    n_blocks = max(len(b) for b in blocks[:rows]) if predicted.blocks else 0
    target = predicted.is_target()
    fetched = torch.zeros_like(queries.pixels[:rows])  # (R, T, P) the retrieved pixels at each target
    shown = predicted.image < rows
    fetched[predicted.image[shown], predicted.index[shown]] = gallery.pixels.flatten(0, 1)[retrieved[shown]]
    titles = ["original", "context only", *[f"target block {j + 1}" for j in range(n_blocks)], "all targets"]
    fig, axes = _new_figure(rows, len(titles))
    for r in range(rows):
        px, ctx, tgt = queries.pixels[r], predicted.context[r], target[r]
        panels = [px, masked_patches(px, ctx, tgt)]
        panels += [masked_patches(px, ctx, tgt, fetched[r], b) for b in blocks[r]]
        panels += [None] * (n_blocks - len(blocks[r]))  # fewer blocks (the masking dropped some): blank
        panels.append(masked_patches(px, ctx, tgt, fetched[r], tgt))
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            if panel is None:
                ax.axis("off")
                continue
            ax.imshow(_picture(panel, queries.grid))
            if 2 <= c < 2 + len(blocks[r]):
                _outline(ax, blocks[r][c - 2], queries.grid, p)
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
    fig.suptitle(title or "each predicted token replaced by the gallery patch whose teacher feature is cosine-nearest\n"
                 "(own image excluded; yellow: the block; dark grey: targets, light grey: patches nobody uses)", fontsize=9)
    return _save(fig, path)


def draw_decoded(queries: Patches, predicted: Predicted, decoded: dict, path=None, rows: int = FIGURE_ROWS):
    """The decoder's pictures, one column per image: the original, then one row per entry of
    `decoded` (row label -> (Q, C*p*p) pixels at the targets, e.g. decoded from the predictions, from
    the position-only baseline, from the teacher's own features: the decoder's best case). Outside
    the targets, the context as the student saw it."""
    cols = min(rows, len(queries.features))
    target = predicted.is_target()
    shown = predicted.image < cols
    labels = ["original", *decoded]
    fig, axes = _new_figure(len(labels), cols)
    for row, source in enumerate(decoded.values(), start=1):
        filled = torch.zeros_like(queries.pixels[:cols])
        filled[predicted.image[shown], predicted.index[shown]] = source[shown].clamp(0, 1)
        for i in range(cols):
            axes[row, i].imshow(_picture(masked_patches(queries.pixels[i], predicted.context[i], target[i], filled[i],
                                                        target[i]), queries.grid))
    for i in range(cols):
        axes[0, i].imshow(_picture(queries.pixels[i], queries.grid))
    for row, label in enumerate(labels):
        axes[row, 0].set_ylabel(label, fontsize=8)
    fig.suptitle("a per-token pixel decoder trained on teacher features of training images only: it never saw a "
                 "prediction", fontsize=9)
    return _save(fig, path)


def draw_pca(queries: Patches, predicted: Predicted, fit_features: torch.Tensor, predictions: dict, path=None,
             rows: int = FIGURE_ROWS):
    """PCA colours, one column per image: the original; the teacher's features of the whole image;
    then one row per entry of `predictions` (row label -> (Q, D) features at `predicted`'s targets,
    grey elsewhere: the predictions, the position-only baseline), all on the same 3 components
    fitted on fit_features (n, D), teacher features of training images."""
    cols = min(rows, len(queries.features))
    teacher, *predicted_colours = pca_colours(fit_features, queries.features[:cols], *predictions.values())
    h, w = queries.grid
    shown = predicted.image < cols
    labels = ["original", "teacher features\n(whole image)", *predictions]
    fig, axes = _new_figure(len(labels), cols)
    for i in range(cols):
        axes[0, i].imshow(_picture(queries.pixels[i], queries.grid))
        axes[1, i].imshow(teacher[i].reshape(h, w, 3).numpy(), interpolation="nearest")
    for row, colours in enumerate(predicted_colours, start=2):
        coloured = torch.full((cols, h * w, 3), 0.5)
        coloured[predicted.image[shown], predicted.index[shown]] = colours[shown]
        for i in range(cols):
            axes[row, i].imshow(coloured[i].reshape(h, w, 3).numpy(), interpolation="nearest")
    for row, label in enumerate(labels):
        axes[row, 0].set_ylabel(label, fontsize=8)
    fig.suptitle("teacher and predicted features on the same 3 principal components (fitted on teacher features "
                 "of training images), as RGB", fontsize=9)
    return _save(fig, path)


def draw_all(evaluated: dict, summary: dict, out: str, rows: int = FIGURE_ROWS) -> list:
    """The three figures of the trained model into `out`, each with the position-only baseline
    beside it where it has one and the metric it illustrates in its labels; returns their paths."""
    t, position = evaluated["trained"], evaluated["position_only"]
    metrics = summary["metrics"]
    paths = [os.path.join(out, name) for name in
             ("ijepa_predictions.png", "ijepa_predictions_decoded.png", "ijepa_predictions_pca.png")]
    top1, region = metrics["trained"]["top1"]["mean"], metrics["trained"].get("same_region", {}).get("mean")
    said = f"retrieval top-1 {top1:.3f}" + (f", same kind of region {region:.3f}" if region is not None else "")
    draw_predictions(t.queries, t.predicted, t.gallery, t.measured.retrieved, paths[0], rows, title=(
        f"each predicted token replaced by the gallery patch whose teacher feature is cosine-nearest ({said}, "
        f"over all {summary['num_images']} images)\n(own image excluded; yellow: the block; dark grey: targets, "
        f"light grey: patches nobody uses)"))
    mse = {name: metrics[name]["pixel_mse"]["mean"] for name in ("trained", "position_only")}
    best = summary["decoder_on_teacher_features"]["trained"]["mean"]
    draw_decoded(t.queries, t.predicted, {
        f"decoded from\npredictions\n(MSE {mse['trained']:.4f})": t.measured.decoded,
        f"decoded from\nposition only\n(MSE {mse['position_only']:.4f})": position.measured.decoded,
        f"decoded from\nteacher features\n(MSE {best:.4f})": t.decoded_truth}, paths[1], rows)
    cosine = {name: metrics[name]["cosine"]["mean"] for name in ("trained", "position_only")}
    draw_pca(t.queries, t.predicted, t.train.features.flatten(0, 1), {
        f"predictions\n(cosine {cosine['trained']:.3f})": t.predicted.features,
        f"position only\n(cosine {cosine['position_only']:.3f})": position.predicted.features}, paths[2], rows)
    return paths


# -----------------------------------------------------------------------------------------------
# 9. The whole run, and the command line


def load_images(dataset: str, resolution: int, n_held_out: int, n_train: int, seed: int = 0) -> tuple:
    """(held-out images, their region maps or None, training images), images (N, 3, H, W) in [0, 1].
    Scenes: the test and train splits, with region maps. Other datasets (a folder, stl10, cifar10):
    their test and train splits, through evaluate.probe_splits (a folder without train/ and test/ is
    split 80/20), without region maps."""
    if dataset == "scenes":
        held_out = data.SceneDataset(n_held_out, resolution=resolution, split="test", seed=seed)
        train = data.SceneDataset(n_train, resolution=resolution, split="train", seed=seed)
        return held_out.tensors()[0], held_out.regions(), train.tensors()[0]
    x_train, _, x_test, _, _ = E.probe_splits(dataset, resolution, n_train, n_held_out, seed)
    return x_test, None, x_train


def check_sizes(num_images: int, gallery_size: int, train_images: int, decoder_steps: int) -> None:
    """One-line errors for sizes that cannot work, said before anything is computed."""
    if num_images < 1:
        raise ValueError(f"--num-images {num_images}: predict at least 1 image")
    if gallery_size < 2:
        raise ValueError(f"--gallery-size {gallery_size}: the gallery needs at least 1 image besides the query's own "
                         f"(which is never searched), so give --gallery-size 2 or more")
    if train_images < 1:
        raise ValueError(f"--train-images {train_images}: the baseline and the decoder need at least 1 training image")
    if decoder_steps < 1:
        raise ValueError(f"--decoder-steps {decoder_steps}: train the decoder for at least 1 step")


@dataclass
class Evaluated:
    """One network's predictions on the held-out images and everything measured from them."""

    predicted: Predicted
    queries: Patches  # the predicted images
    gallery: Patches  # the images searched (a prediction skips its own)
    train: Patches  # the training images: the baseline's means and the decoder's data
    decoder: PixelDecoder
    decoder_losses: list  # its training loss (pixel MSE) at every step
    measured: Measured
    decoded_truth: torch.Tensor  # (Q, C*p*p) the decoder on the true teacher features at the targets: its best case


def predict_and_measure(net: M.IJEPA, held_out: torch.Tensor, regions, train_images: torch.Tensor, masking,
                        num_images: int, gallery_size: int, decoder_steps: int, seed: int, progress: bool) -> Evaluated:
    """Sections 1-6 for one network: its teacher's patches of the held-out and training images, its
    predictions on the first `num_images` held-out images, a decoder trained on its teacher's
    features, and the metrics, with the first `gallery_size` held-out images as the gallery."""
    pool = teacher_patches(net, held_out, regions, progress=progress)
    train = teacher_patches(net, train_images, progress=progress)
    predicted = mask_and_predict(net, held_out[:num_images], masking, seed, progress=progress)
    decoder, losses = train_pixel_decoder(train.features.flatten(0, 1), train.pixels.flatten(0, 1),
                                          steps=decoder_steps, seed=seed, progress=progress)
    queries, gallery = pool.first(num_images), pool.first(gallery_size)
    measured = prediction_metrics(predicted, queries, gallery, decoder, progress=progress)
    with torch.no_grad():
        truth = decoder(queries.features[predicted.image, predicted.index]).clamp(0, 1)
    return Evaluated(predicted, queries, gallery, train, decoder, losses, measured, truth)


def position_only(trained: Evaluated) -> Evaluated:
    """The position-only baseline (section 4) as an Evaluated: its predictions at the trained model's
    targets, scored in the trained teacher's feature space with the trained model's decoder; every
    other field is the trained model's."""
    predicted = position_only_prediction(trained.train, trained.predicted)
    return dataclasses.replace(trained, predicted=predicted,
                               measured=prediction_metrics(predicted, trained.queries, trained.gallery, trained.decoder))


@dataclass
class Result:
    """What `run` computed: the summary it prints and writes, and the objects behind it, for a
    notebook to show and explain (Predictor_Visualisation.ipynb)."""

    summary: dict  # the numbers, JSON-ready once json_ready has replaced NaN: what main prints and writes
    evaluated: dict  # MODELS -> Evaluated ("position_only": see position_only)
    models: dict  # "trained", "random_init" -> the IJEPA that was scored
    cfg: T.TrainConfig  # the checkpoint's configuration (its masking is the one used)


def run(checkpoint: str, dataset: str = "scenes", num_images: int = NUM_IMAGES, gallery_size: int = GALLERY_SIZE,
        train_images: int = TRAIN_IMAGES, decoder_steps: int = DECODER_STEPS, seed: int = 0, resolution=None,
        out="images", figure_rows: int = FIGURE_ROWS, progress: bool = True) -> Result:
    """Everything the command line does: the numbers of the trained model, its random init and the
    position-only baseline on held-out images, and the three figures (into `out`; None or "" for
    none). Returns the summary (what main prints and writes as JSON) with the objects it came from."""
    start = time.perf_counter()
    check_sizes(num_images, gallery_size, train_images, decoder_steps)
    model, cfg = T.model_from_checkpoint(checkpoint)
    if cfg.method in T.PIXEL_METHODS:
        raise ValueError(f"{checkpoint} is a checkpoint of --method {cfg.method}: its decoder predicts pixels, and "
                         f"this job measures predicted features against the teacher's. Probe its encoder with evaluate.py probe or depth")
    resolution = resolution or cfg.resolution
    check_image_size(resolution, resolution, cfg.patch_size)  # before the loaders, whose own limits would hide the reason
    held_out, regions, train_x = load_images(dataset, resolution, max(num_images, gallery_size), train_images, cfg.seed)
    notes = [] if regions is not None else \
        [f"same_region not measured: {dataset!r} has no region maps (only the built-in scenes do)"]
    if len(held_out) < max(num_images, gallery_size):
        notes.append(f"{dataset!r} has {len(held_out)} held-out images: fewer predicted and searched than asked")
        num_images, gallery_size = min(num_images, len(held_out)), min(gallery_size, len(held_out))
    if gallery_size < 2:
        raise ValueError(f"{dataset!r} has only {len(held_out)} held-out image(s): the gallery needs 2 or more; "
                         f"use a dataset with more images")
    if len(train_x) < 1:
        raise ValueError(f"{dataset!r} has no training images: the baseline and the decoder need some")
    masking = cfg.make_masking()  # the masking the model was trained with
    evaluated, models = {}, {"trained": model, "random_init": T.initial_model(cfg)}
    for name, net in models.items():
        if progress:
            print(f"{name.replace('_', ' ')}: teacher features, predictions, pixel decoder, retrieval")
        evaluated[name] = predict_and_measure(net, held_out, regions, train_x, masking, num_images, gallery_size,
                                              decoder_steps, seed, progress)
    t = evaluated["trained"]  # the baseline lives in the trained teacher's feature space, with its decoder
    evaluated["position_only"] = position_only(t)
    measured = {name: evaluated[name].measured for name in MODELS}
    decoder_best = {}
    for name in models:
        e = evaluated[name]
        error = ((e.decoded_truth - e.queries.pixels[e.predicted.image, e.predicted.index]) ** 2).mean(1)
        decoder_best[name] = mean_and_se(per_image_mean(error, e.predicted.image, num_images))
    summary = {"checkpoint": checkpoint, "dataset": dataset, "resolution": resolution, "seed": seed,
               "num_images": num_images, "gallery_images": gallery_size, "train_images": len(train_x),
               "targets": len(t.predicted.features), "masking": cfg.masking,
               "decoder": {"hidden": DECODER_HIDDEN, "steps": decoder_steps},
               "metrics": {name: summarise(measured[name]) for name in MODELS},
               "trained_minus": {other: paired_difference(measured["trained"], measured[other])
                                 for other in ("random_init", "position_only")},
               "decoder_on_teacher_features": decoder_best, "notes": notes, "figures": []}
    if out:
        summary["figures"] = draw_all(evaluated, summary, out, figure_rows)
    summary["seconds"] = time.perf_counter() - start
    return Result(summary, evaluated, models, cfg)


METRIC_NAMES = {"top1": "retrieval top-1 (own image in gallery)", f"top{TOP_K}": f"retrieval top-{TOP_K} (own image in gallery)",
                "same_region": "same region, nearest patch (own image out)", "cosine": "cosine to the true target",
                "pixel_mse": "decoder pixel MSE (lower is better)"}


def _mean_se(v: dict) -> str:  # "mean +-se", the error to two significant digits
    return f"{v['mean']:.4f} +-{v['se']:<7.2g}"


def print_metrics(metrics: dict, trained_minus: dict) -> None:
    """The table: each metric of each model in `metrics` ({model: summarise(...)}), mean +- standard
    error over images; then the trained model's paired differences ({other: paired_difference(...)})
    in standard errors."""
    names = [m for m in MODELS if m in metrics]
    print(f"{'':<44}" + "".join(f"{name.replace('_', ' '):<20}" for name in names))
    for key, label in METRIC_NAMES.items():
        if all(key in metrics[m] for m in names):
            print(f"{label:<44}" + "".join(f"{_mean_se(metrics[m][key]):<20}" for m in names))
    for other, diff in trained_minus.items():
        print(f"\ntrained minus {other.replace('_', ' ')} (paired over images):")
        for key, label in METRIC_NAMES.items():
            if key in diff:
                d = diff[key]
                z = d["mean"] / d["se"] if d["se"] > 0 else float("nan")
                print(f"  {label:<44}{d['mean']:+.4f} +-{d['se']:<7.2g} ({z:+.1f} s.e.)")


def print_summary(result: dict) -> None:
    print(f"\n{result['num_images']} held-out images ({result['targets']} predicted tokens), gallery of "
          f"{result['gallery_images']} held-out images (a prediction never searches its own), {result['train_images']} "
          f"training images for the baseline and the decoder; mean +- standard error over images")
    print_metrics(result["metrics"], result["trained_minus"])
    dec = result["decoder_on_teacher_features"]
    print("\ndecoder pixel MSE on the true teacher features at the targets (its best case): "
          + ", ".join(f"{name.replace('_', ' ')} {_mean_se(v).strip()}" for name, v in dec.items()))
    for note in result["notes"]:
        print(f"note: {note}")
    for path in result["figures"]:
        print(f"written: {path}")


def json_ready(value):
    """The summary with NaN (the standard error of a single image) as None, which JSON can hold."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def main(argv=None) -> int:
    """The command line: a mistake a user can make (a missing or corrupt checkpoint, a dataset that
    is not there or empty, impossible sizes) prints one line, `error: ...`, and returns 1 (as train.py
    and evaluate.py do)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a train.py checkpoint (default: the reference model, else checkpoints/demo, "
                                         "trained first if missing)")
    ap.add_argument("--dataset", default="scenes", help="scenes (built in), stl10, cifar10, or a folder of images")
    ap.add_argument("--num-images", type=int, default=NUM_IMAGES, help="held-out images whose targets are predicted")
    ap.add_argument("--gallery-size", type=int, default=GALLERY_SIZE,
                    help="held-out images whose patches are searched (a prediction never searches its own image)")
    ap.add_argument("--train-images", type=int, default=TRAIN_IMAGES,
                    help="training images for the position-only baseline and the decoder")
    ap.add_argument("--decoder-steps", type=int, default=DECODER_STEPS, help="training steps of each pixel decoder")
    ap.add_argument("--resolution", type=int, help="image side in pixels (default: the checkpoint's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the masks and of the decoder")
    ap.add_argument("--out", default="images", help="folder for the figures (default: images/)")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)

    def work():
        check_sizes(args.num_images, args.gallery_size, args.train_images, args.decoder_steps)
        data.check_dataset(args.dataset)
        checkpoint = T.checkpoint_to_use(args.checkpoint)
        result = run(checkpoint, args.dataset, args.num_images, args.gallery_size, args.train_images,
                     args.decoder_steps, args.seed, args.resolution, args.out).summary
        print_summary(result)
        if args.json:
            os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(json_ready(result), f, indent=1, allow_nan=False)
            print(f"written: {args.json}")
        print(f"{result['seconds']:.0f} s")
        return 0

    return T.run_command("predict_and_visualize.py", work)


if __name__ == "__main__":
    sys.exit(main())
