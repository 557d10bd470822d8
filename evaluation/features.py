"""Features of a frozen encoder for the probes: the mean-pooled tokens of every layer (or pooled over a
grid of cells), every token of every layer, and a cache of them keyed by what made them.

Layers are numbered as the probes report them: blocks 1..depth (before the encoder's last layer),
then depth + 1, the final output (after it)."""

import hashlib
import json
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm


def check_pool_grid(grid: tuple, cells: int) -> None:
    """Raise a ValueError unless `cells` divides both sides of the h x w patch grid."""
    h, w = grid
    if cells < 1 or h % cells or w % cells:
        raise ValueError(f"pool grid {cells}: must divide the {h} x {w} patch grid (try 1, or a divisor of both sides)")


def grid_pool(tokens: torch.Tensor, grid: tuple, cells: int = 1) -> torch.Tensor:
    """Tokens (B, h*w, D) in raster order over an h x w patch grid -> (B, cells*cells*D): the mean
    token of each cell of a cells x cells split of the grid, cells in raster order. cells=1 is the
    plain mean of all tokens, the probe feature of the I-JEPA paper; more cells keep where things
    are, which the plain mean throws away (a digit's class lies in where its strokes are)."""
    b, n, d = tokens.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"{n} tokens do not form a {h} x {w} grid")
    check_pool_grid(grid, cells)
    image = tokens.transpose(1, 2).reshape(b, d, h, w)  # (B, D, h, w): channels first, as avg_pool2d reads them
    # one average per cell; a strided mean over the token grid's two cell axes did the same 10x slower
    cell = F.avg_pool2d(image, (h // cells, w // cells))  # (B, D, cells, cells)
    return cell.permute(0, 2, 3, 1).flatten(1)             # (B, cells*cells*D), cells in raster order


@torch.no_grad()
def layer_features(encoder, images: torch.Tensor, batch_size: int = 256, normalize=None, progress=False,
                   pool_grid: int = 1) -> list:
    """Mean-pooled tokens of every block and of the final output, for all images.

    images (N, C, H, W) -> list of depth + 1 float32 arrays (N, D): blocks 1..depth (before the
    encoder's last layer), then the final output (after it). With pool_grid k > 1 the tokens are
    pooled over a k x k grid of cells instead (`grid_pool`): arrays (N, k*k*D). `normalize` is
    applied to each image batch first (e.g. data.normalize). The encoder's own `encode` is used,
    so an encoder that encodes in its own way (studies/ec_ijepa.py) is probed as it encodes."""
    p = encoder.cfg.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    check_pool_grid(grid, pool_grid)  # before any encoding
    return [torch.cat(chunks).numpy() for chunks in zip(*_batched_layers(encoder, images, batch_size, normalize, progress,
                                                                          lambda t: grid_pool(t.float(), grid, pool_grid).cpu()))]


@torch.no_grad()
def token_features(encoder, images: torch.Tensor, batch_size: int = 256, normalize=None, progress=False) -> list:
    """Like `layer_features` but every token kept: a list of depth + 1 tensors (N, h*w, D), raster order."""
    return [torch.cat(chunks) for chunks in zip(*_batched_layers(encoder, images, batch_size, normalize, progress,
                                                                  lambda t: t.float().cpu()))]


@torch.no_grad()
def final_tokens(encoder, images: torch.Tensor, batch_size: int = 256, normalize=None, progress=False) -> torch.Tensor:
    """The encoder's final output tokens only (after its last layer): (N, h*w, D), raster order."""
    return torch.cat([layers[-1].float().cpu() for layers in
                      _batched_layers(encoder, images, batch_size, normalize, progress, lambda t: t)])


def _batched_layers(encoder, images, batch_size, normalize, progress, reduce):
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    starts = range(0, len(images), batch_size)
    for i in tqdm(starts, desc="features", disable=not progress or len(starts) < 4, mininterval=5):
        x = images[i:i + batch_size].to(device)
        out, layers = encoder.encode(normalize(x) if normalize else x, return_layers=True)
        yield [reduce(t) for t in (*layers, out)]
    encoder.train(was_training)


# -----------------------------------------------------------------------------------------------
# 3. A cache of features, keyed by what made them


FEATURES_VERSION = 2  # raise when the feature extraction changes: every cached file becomes stale


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def cached(cache_dir, key: dict, compute):
    """compute() once per key: the key (checkpoint digest, encoder, dataset, split, sizes...) names
    the file, so features of another checkpoint or dataset are never read back. No cache_dir: compute."""
    if not cache_dir:
        return compute()
    name = hashlib.sha256(json.dumps({**key, "version": FEATURES_VERSION}, sort_keys=True).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"features-{name}.pt")
    if os.path.exists(path):
        try:
            saved = torch.load(path, weights_only=True)
        except Exception:  # truncated, or written in another format: computed again and replaced
            saved = {}
        if saved.get("key") == {**key, "version": FEATURES_VERSION}:
            return saved["value"]
    value = compute()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: parallel probes may fill the same entry
    torch.save({"key": {**key, "version": FEATURES_VERSION}, "value": value}, tmp)
    os.replace(tmp, path)
    return value
