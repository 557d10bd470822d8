"""Sequence packing: variable-resolution images packed into fixed-shape batches.

The pipeline, per image:
  1. variable resolution: a random size with the image's aspect ratio kept, the area capped and
     the sides rounded to multiples of patch x window (`random_size`, `resize`);
  2. split: patchify and cut into a context stream and a hidden stream (`models.split_image`);
  3. pack: first-fit into `rows` rows, each with `context_len` context slots and `hidden_len`
     hidden slots: an image goes into the first row with room in *both* streams, so its two
     streams share a row (`Packer`).

Every batch has the same tensor shapes, so a compiled model never recompiles, and the model of
models.py trains on it through its ordinary forward: attention is block-diagonal by sample id.
Unlike a packer that drops the image that triggers each flush, every image comes
out exactly once: an image that finds no room waits for the next batch, and the end of a finite
stream flushes the rest into final, partly filled batches.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import models as M


@dataclass(frozen=True)
class PackingConfig:
    patch_size: int = 8
    window: int = 2  # sides are multiples of patch_size * window (window masking needs whole windows)
    side_range: tuple = (32, 96)  # the longer side is drawn uniformly in this range (pixels)
    min_side: int = 32  # no side shorter (a multiple of patch x window; multi-block needs 4 patches)
    max_area: int = 96 * 96  # then the area is capped
    rows: int = 16
    context_len: int = 96
    hidden_len: int = 128
    max_images_per_row: int = 16  # the batch's images_per_row: a fixed bound for per-image extras (encoder conditioning)
    fit: str = "error"  # an image that can never fit a row: "error", or "resize" it down until it fits

    def __post_init__(self):
        m = self.multiple
        if self.rows < 1:
            raise ValueError(f"rows must be at least 1, got {self.rows}")
        if self.max_images_per_row < 1:
            raise ValueError(f"max_images_per_row must be at least 1, got {self.max_images_per_row}")
        if self.side_range[0] > self.side_range[1] or self.side_range[1] < m:
            raise ValueError(f"side_range {self.side_range} cannot hold one {m}-px window "
                             f"(patch {self.patch_size} x window {self.window}); raise its upper end to at least {m}")
        if self.min_side % m or self.min_side > self.side_range[1]:
            raise ValueError(f"min_side {self.min_side} must be a multiple of {m} px and at most side_range's "
                             f"upper end {self.side_range[1]}")
        if self.max_area < m * m:
            raise ValueError(f"max_area {self.max_area} is below one window ({m}x{m} px); raise it")
        smallest = (self.min_side // self.patch_size) ** 2  # tokens of the smallest possible image
        if self.context_len < 1 or self.hidden_len < 1 or self.context_len + self.hidden_len < smallest:
            raise ValueError(f"a row of {self.context_len} context + {self.hidden_len} hidden slots cannot "
                             f"hold even the smallest image ({smallest} patches); raise context_len/hidden_len")
        if self.fit not in ("error", "resize"):
            raise ValueError(f"fit must be 'error' or 'resize', got {self.fit!r}")

    @property
    def multiple(self) -> int:
        return self.patch_size * self.window

    @classmethod
    def balanced(cls, masking, row_tokens: int = 224, image_size: tuple = (96, 96), **kwargs):
        """A config whose rows split `row_tokens` slots between the two streams in proportion to
        the masking's mean context fraction, measured over 500 images of `image_size` drawn
        through the same variable-resolution step, so neither stream fills while the other has room."""
        probe = cls(**{**kwargs, "context_len": row_tokens, "hidden_len": row_tokens})
        g = torch.Generator().manual_seed(0)
        context = total = 0
        for _ in range(500):
            h, w = random_size(*image_size, probe, g)
            h, w = h // probe.patch_size, w // probe.patch_size
            context, total = context + len(masking(h, w, g).context), total + h * w
        context_len = round(row_tokens * context / total)
        return cls(**{**kwargs, "context_len": context_len, "hidden_len": row_tokens - context_len})


# -----------------------------------------------------------------------------------------------
# 1. Variable resolution


def random_size(height: int, width: int, cfg: PackingConfig, g: torch.Generator) -> tuple:
    """A random (height, width) for an image of the given size: the longer side uniform in
    cfg.side_range, then scaled up if needed so the shorter side reaches cfg.min_side, and down if
    needed so the area stays under cfg.max_area; aspect ratio kept, sides rounded to multiples of
    patch x window. Only an image too elongated for both limits at once loses its aspect ratio."""
    lo, hi = cfg.side_range
    side = lo + (hi - lo) * torch.rand((), generator=g).item()
    scale = side / max(height, width)
    scale = max(scale, cfg.min_side / min(height, width))
    scale = min(scale, math.sqrt(cfg.max_area / (height * width)))
    m = cfg.multiple

    def round_side(x):
        return max(cfg.min_side, int(x * scale / m + 0.5) * m)

    h, w = round_side(height), round_side(width)
    while h * w > cfg.max_area and max(h, w) > cfg.min_side:  # rounding up may overshoot the cap by a window
        h, w = (h - m, w) if h >= w else (h, w - m)
    return h, w


def resize(image: torch.Tensor, size: tuple) -> torch.Tensor:
    """(C, H, W) -> (C, h, w), bilinear with antialiasing."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


# -----------------------------------------------------------------------------------------------
# 3. The packer


class Packer:
    """Dual-stream first-fit packing into batches of fixed shape.

    Images collect in a pool. When the pool holds `pool_factor` times the tokens of a batch, they
    are placed largest first (by the stream they fill most), each into the first row with room in
    both streams; the batch is emitted and what found no room stays in the pool for the next one.
    Taking the largest first leaves the small images to fill the rows' last gaps (measured: about
    2 points of occupancy over placing them in arrival order). `add` returns the batches that
    became ready (zero or one); `flush` empties the pool into final batches. Nothing is dropped.
    """

    def __init__(self, cfg: PackingConfig, pool_factor: float = 2.0):
        self.cfg = cfg
        self.pool = []
        self.pool_tokens = 0
        self.batch_tokens = cfg.rows * (cfg.context_len + cfg.hidden_len)
        self.pool_factor = pool_factor

    def add(self, s: M.SplitImage) -> list:
        nc, nt = len(s.context_pos), len(s.hidden_pos)
        if nc > self.cfg.context_len or nt > self.cfg.hidden_len:
            raise ValueError(f"an image of {s.grid[0]}x{s.grid[1]} patches has {nc} context and {nt} hidden "
                             f"tokens, more than a row holds ({self.cfg.context_len}/{self.cfg.hidden_len}); raise "
                             f"context_len/hidden_len, lower side_range/max_area, or use fit='resize'")
        self.pool.append(s)
        self.pool_tokens += nc + nt
        return [self._emit()] if self.pool_tokens >= self.pool_factor * self.batch_tokens else []

    def flush(self) -> list:
        out = []
        while self.pool:
            out.append(self._emit())
        return out

    def _emit(self) -> M.MaskedBatch:
        cfg = self.cfg
        rows = [[] for _ in range(cfg.rows)]
        used = [[0, 0] for _ in range(cfg.rows)]  # (context, hidden) slots taken per row
        self.pool.sort(key=lambda s: -max(len(s.context_pos) / cfg.context_len, len(s.hidden_pos) / cfg.hidden_len))
        left = []
        for s in self.pool:
            nc, nt = len(s.context_pos), len(s.hidden_pos)
            for row, u in zip(rows, used):
                if u[0] + nc <= cfg.context_len and u[1] + nt <= cfg.hidden_len and len(row) < cfg.max_images_per_row:
                    row.append(s)
                    u[0], u[1] = u[0] + nc, u[1] + nt
                    break
            else:
                left.append(s)
        self.pool, self.pool_tokens = left, sum(len(s.context_pos) + len(s.hidden_pos) for s in left)
        return M.MaskedBatch.from_rows(rows, cfg.context_len, cfg.hidden_len, images_per_row=cfg.max_images_per_row)


# -----------------------------------------------------------------------------------------------
# The whole pipeline: images prepared in DataLoader workers, then packed in order


def prepare(image: torch.Tensor, cfg: PackingConfig, masking, g: torch.Generator, label=-1) -> M.SplitImage:
    """Steps 1 and 2 for one image: random size, resize, split. With cfg.fit == 'resize', an
    image whose streams cannot fit a row is shrunk by one window per side until it fits."""
    size = random_size(image.shape[-2], image.shape[-1], cfg, g)
    while True:
        s = M.split_image(resize(image, size), cfg.patch_size, masking, g, label)
        if s.context_pos.shape[0] <= cfg.context_len and s.hidden_pos.shape[0] <= cfg.hidden_len:
            return s
        if cfg.fit == "error" or max(size) <= cfg.min_side:
            return s  # the packer raises its error for it
        m = cfg.multiple
        size = (max(cfg.min_side, size[0] - m), max(cfg.min_side, size[1] - m))


def pack_images(images, cfg: PackingConfig, masking, g: torch.Generator):
    """Pack an iterable of images (or (image, label) pairs) into MaskedBatches, in one process."""
    packer = Packer(cfg)
    for item in images:
        image, label = item if isinstance(item, tuple) else (item, -1)
        yield from packer.add(prepare(image, cfg, masking, g, label))
    yield from packer.flush()


class BatchStream:
    """Training batches of a map-style dataset, prepared in `workers` DataLoader worker processes.

    With `packing` (a PackingConfig), images get random sizes and are packed; with
    `packing=None`, images keep their size and go `batch_size` to an ordinary batch (one image
    per row). Rank r of `world` takes images r, r+world, r+2*world, ... of an order shuffled by
    (seed, epoch) and cuts them into groups of `batch_size`. Group k is prepared (augmented,
    sized, masked, split) with a generator seeded by (seed, epoch, rank, k) alone, by worker
    k mod `workers`; the DataLoader takes one item from each worker in turn, so the groups arrive
    in order. An ordinary batch is one group; packed batches are packed from the groups, in order,
    in the iterating process, which holds the packer's pool. So the batches are the same for any
    number of workers (a resumed run may use another), and a seed reproduces every batch.

    Items of `dataset` are images (C, H, W), (image, label) pairs, or dicts with "image" and
    optional "label". `augment`, if given, is called as augment(image, generator) on each image
    before it is sized and masked (e.g. data.RandomShiftFlip), with the group's generator.
    Iterate it for one epoch's batches; call `set_epoch` between epochs.
    """

    def __init__(self, dataset, masking, patch_size: int, packing: PackingConfig | None = None,
                 batch_size: int = 64, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1,
                 augment=None, workers: int = 0):
        if packing is not None and packing.patch_size != patch_size:
            raise ValueError(f"packing.patch_size {packing.patch_size} differs from the model's patch size {patch_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset, self.masking, self.patch_size, self.packing = dataset, masking, patch_size, packing
        self.batch_size, self.seed, self.shuffle, self.rank, self.world = batch_size, seed, shuffle, rank, world
        self.augment, self.workers, self.epoch = augment, workers, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def groups(self) -> list:
        """This rank's images of this epoch, in groups of batch_size: lists of dataset indices."""
        order = torch.arange(len(self.dataset))
        if self.shuffle:
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + 7919 * self.epoch))
        mine = order[self.rank::self.world].tolist()
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def prepare_group(self, k: int, indices: list) -> M.MaskedBatch:
        """Group k's images, each augmented, sized (packing) and split, as an ordinary batch (one
        image per row). Its draws come from its own generator: the hash of a tuple of ints is the
        same in every process and run (only str and bytes hashes are salted)."""
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank, k)))
        splits = []
        for i in indices:
            image, label = self._image(i)
            if self.augment is not None:
                image = self.augment(image, g)
            if self.packing is None:
                splits.append(M.split_image(image, self.patch_size, self.masking, g, label))
            else:
                splits.append(prepare(image, self.packing, self.masking, g, label))
        return M.MaskedBatch.padded(splits)

    def _image(self, i) -> tuple:
        item = self.dataset[i]
        if isinstance(item, dict):
            return item["image"], int(item.get("label", -1))
        if isinstance(item, (tuple, list)):
            return item[0], int(item[1])
        return item, -1

    def __iter__(self):
        # A DataLoader draws a seed for its workers each time it is iterated, from torch's global
        # generator unless it has its own. Its own keeps the global generator for the model: a
        # resumed run, which starts iterating mid-epoch, then draws the same numbers as the run it
        # continues (SIGReg's directions come from it). The groups never use that seed.
        groups = torch.utils.data.DataLoader(PreparedGroups(self), batch_size=None, num_workers=self.workers,
                                             generator=torch.Generator().manual_seed(self.seed))
        if self.packing is None:
            yield from groups
            return
        # The packer's pool carries images over from one batch to the next, so the packing is done
        # here, in order: workers that each packed their own groups would make other batches for
        # another number of workers. A group crosses from its worker as one padded batch (a few
        # tensors): hundreds of small SplitImage tensors would cost more than unpadding them here.
        packer = Packer(self.packing)
        for group in groups:
            for s in unpad(group):
                yield from packer.add(s)
        yield from packer.flush()


class PreparedGroups(torch.utils.data.IterableDataset):
    """One epoch of a BatchStream's groups, for a DataLoader: worker w of W prepares groups
    w, w+W, w+2W, ..., so that taking one item from each worker in turn gives them in order."""

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        groups = self.stream.groups()
        for k in range(worker, len(groups), workers):
            yield self.stream.prepare_group(k, groups[k])


def unpad(batch: M.MaskedBatch) -> list:
    """An ordinary batch (one image per row, `MaskedBatch.padded`) -> its SplitImages again."""
    splits = []
    for r, (grid, label) in enumerate(zip(batch.grids.tolist(), batch.labels.tolist())):
        c, h = batch.context_sample[r] >= 0, batch.hidden_sample[r] >= 0
        splits.append(M.SplitImage(batch.context_patches[r, c], batch.context_pos[r, c], batch.hidden_patches[r, h],
                                   batch.hidden_pos[r, h], batch.is_target[r, h], tuple(grid), label))
    return splits


def occupancy(batch: M.MaskedBatch) -> float:
    """Real tokens / token slots, over both streams."""
    real = (batch.context_sample >= 0).sum() + (batch.hidden_sample >= 0).sum()
    return float(real) / (batch.context_sample.numel() + batch.hidden_sample.numel())


def rebuild_images(batch: M.MaskedBatch, patch_size: int) -> list:
    """Each image of a batch rebuilt from its tokens: a list of (C, h*p, w*p) tensors."""
    images = []
    for i, (h, w) in enumerate(batch.grids.tolist()):
        in_ctx, in_tgt = batch.context_sample == i, batch.hidden_sample == i
        patches = torch.cat([batch.context_patches[in_ctx], batch.hidden_patches[in_tgt]])  # (h*w, P)
        pos = torch.cat([batch.context_pos[in_ctx], batch.hidden_pos[in_tgt]])  # (h*w, 2)
        grid = torch.empty_like(patches)
        grid[pos[:, 0] * w + pos[:, 1]] = patches
        images.append(M.unpatchify(grid[None], (h, w), patch_size)[0])
    return images


# -----------------------------------------------------------------------------------------------
# Pictures for the notebooks


def sample_colours(n: int) -> torch.Tensor:
    """n distinct RGB colours (n, 3), spread around the hue circle."""
    import matplotlib.colors as mcolors
    hues = (torch.arange(n) * 0.618034) % 1.0  # golden-ratio steps keep neighbours apart
    hsv = torch.stack([hues, torch.full((n,), 0.65), torch.full((n,), 0.95)], dim=1)
    return torch.from_numpy(mcolors.hsv_to_rgb(hsv.numpy())).float()


def token_picture(sample: torch.Tensor) -> torch.Tensor:
    """(rows, L) sample ids -> (rows, L, 3) colours, padding grey."""
    colours = sample_colours(int(sample.max()) + 1)
    pic = torch.full((*sample.shape, 3), 0.8)
    real = sample >= 0
    pic[real] = colours[sample[real]]
    return pic


def draw_packed_batch(batch: M.MaskedBatch, path=None, title=None):
    """The two streams of a packed batch, one token per cell, coloured by image, padding grey."""
    import matplotlib.pyplot as plt
    lc, lt = batch.context_sample.shape[1], batch.hidden_sample.shape[1]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.3 * len(batch.context_sample) + 1.5),
                             gridspec_kw={"width_ratios": [lc, lt]})
    for ax, sample, name in [(axes[0], batch.context_sample, "context stream"), (axes[1], batch.hidden_sample, "hidden stream")]:
        ax.imshow(token_picture(sample).numpy(), aspect="auto", interpolation="nearest")
        ax.set_title(f"{name}: {sample.shape[0]} rows x {sample.shape[1]} slots")
        ax.set_xlabel("token slot")
    axes[0].set_ylabel("row")
    fig.suptitle(title or f"{len(batch.grids)} images packed, occupancy {occupancy(batch):.1%}")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def draw_attention_mask(batch: M.MaskedBatch, row: int = 0, path=None):
    """The teacher's attention mask for one row (both streams), True = may attend."""
    import matplotlib.pyplot as plt
    sample = torch.cat([batch.context_sample[row], batch.hidden_sample[row]])[None]
    mask = M.attention_mask(sample)[0, 0]  # (L, L)
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(mask.numpy(), cmap="Greys", interpolation="nearest")
    lc = batch.context_sample.shape[1]
    ax.axvline(lc - 0.5, color="tab:red", lw=1)
    ax.axhline(lc - 0.5, color="tab:red", lw=1)
    ax.set_title(f"row {row}: may attend (black); red line: context | hidden stream")
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig
