"""
Data for I-JEPA experiments, in one file.

1. A built-in procedural 3-D scene dataset. Each image is ray-cast by a small batched torch renderer
   and is fully determined by (seed, index): nothing to download. A main object (sphere, cube,
   cylinder or cone) and 0-3 smaller distractors stand on a checker ground under a sky, lit by a
   random sun with exact shadows. Labels per image: `shape` (the main object's), `count` (class c =
   c + 1 objects) and `distance` (bucket of the camera's distance to the nearest object); per pixel:
   `depth` and `mask` (the main object); per image also the causes (`scene_factors`: camera, the main
   object's place and hue, the sun). render_scenes() renders a batch; SceneDataset caches a split.
2. ImageNet normalisation: normalize(), denormalize().
3. Real datasets returning the same item dicts: STL-10, CIFAR-10, a folder of images, NYU Depth v2;
   get_dataset() gives any of them by name.
4. draw_samples(): a picture of a few samples with their labels, depth and mask.

Conventions: images are float32 in [0, 1], channels first; the world is y-up with the ground at
y = 0; in its own frame the camera looks along +z.
"""
import functools
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

import models as M

SHAPES = ("sphere", "cube", "cylinder", "cone")
LABELS = ("shape", "count", "distance")
SPLITS = ("train", "val", "test")
SPLIT_OFFSET = {"train": 0, "val": 10**9, "test": 2 * 10**9}  # disjoint index ranges per split
SKY_DEPTH = 50.0  # depth written for sky pixels; ground further away than this is clipped to it


@dataclass(frozen=True)
class SceneConfig:
    """Knobs that change how hard the scenes are. Defaults are tuned for 64 px images."""
    main_size: tuple = (0.9, 1.2)         # scale of the main object (unit shapes are ~2 units tall)
    distractor_size: tuple = (0.4, 0.6)   # clearly smaller than the main object (larger ones may overlap)
    max_distractors: int = 3              # 0..max_distractors extra objects, uniformly
    camera_distance: tuple = (6.0, 9.0)   # from the aim point, scene units
    camera_elevation: tuple = (8.0, 40.0)  # degrees above the horizon
    fov: float = 50.0                     # field of view across the shorter image side, degrees
    checker_contrast: tuple = (0.1, 0.4)  # ground texture strength (it also fades with distance)
    noise: float = 0.02                   # std of per-pixel Gaussian noise
    colour_jitter: float = 0.1            # per-image random brightness and contrast change
    shadows: bool = True                  # exact shadow rays (about 1.5x slower when on)
    distance_edges: tuple = (6.4, 7.1, 7.85)  # nearest-object distance buckets, ~balanced for defaults

    def __post_init__(self):
        if not 0 <= self.max_distractors <= 4:  # distractors stand in 4 sectors around the main object
            raise ValueError(f"max_distractors must be in 0..4, got {self.max_distractors}")


def num_classes(label, config=SceneConfig()):
    """Number of classes of an image-level scene label."""
    _check_label(label)
    return {"shape": len(SHAPES), "count": config.max_distractors + 1,
            "distance": len(config.distance_edges) + 1}[label]


def _check_label(label):
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}: choose one of {LABELS}")


def _check_resolution(resolution):
    """int or (height, width) -> (height, width), each in 32..256."""
    hw = (resolution, resolution) if isinstance(resolution, (int, np.integer)) else tuple(resolution)
    if len(hw) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 32 <= s <= 256 for s in hw):
        raise ValueError(f"resolution must be an int or an (height, width) pair of ints in 32..256, got {resolution!r}")
    return int(hw[0]), int(hw[1])

# -----------------------------------------------------------------------------
# Random numbers that depend only on (seed, index): a counter-based hash (SplitMix64), vectorised
# over the batch. A per-image numpy Generator would do the same job but costs ~90 us per image.

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)


def _mix64(z):
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)  # uint64 arrays wrap around, as wanted
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _uniforms(indices, seed, n):
    """(B,) image indices -> (B, n) float32 uniforms in [0, 1), a fixed stream per (seed, index)."""
    state = _mix64(_mix64(np.array([seed], dtype=_U64) + _GOLDEN) ^ (indices.astype(_U64) * _GOLDEN))
    z = _mix64(state[:, None] + np.arange(1, n + 1, dtype=_U64) * _GOLDEN)
    return torch.from_numpy((z >> _U64(40)).astype(np.float32) / np.float32(2**24))


class _Draws:
    """Hands out consecutive columns of the uniform table: u.next(lo, hi) -> (B,) in [lo, hi)."""
    def __init__(self, table):
        self.table, self.col = table, 0

    def next(self, lo=0.0, hi=1.0, k=None):
        n = 1 if k is None else k
        cols = lo + (hi - lo) * self.table[:, self.col:self.col + n]
        self.col += n
        return cols[:, 0] if k is None else cols


def _hsv(h, s, v):
    """(B,) hue, saturation, value in [0,1] -> (B, 3) rgb."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * h[:, None]) % 6
    return v[:, None] - (v * s)[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)

# -----------------------------------------------------------------------------
# The unit shapes, each standing on y = 0 in its own frame, all about 2 units wide and tall.
# A hit function takes local ray origins and directions as (3, N) tensors (one row per coordinate,
# so every operation runs over long contiguous rows) and returns the nearest hit distance t (N,)
# (inf = miss or behind) and the local surface normal (3, N), not normalised.

def _hit_sphere(o, d):  # radius 1, centre (0, 1, 0)
    o = o - torch.tensor([[0.0], [1.0], [0.0]])
    a, b, c = (d * d).sum(0), (o * d).sum(0), (o * o).sum(0) - 1
    disc = b * b - a * c
    t = (-b - disc.clamp_min(0).sqrt()) / a
    t = torch.where((disc >= 0) & (t > 0), t, math.inf)
    return t, o + t.clamp_max(1e6) * d


def _hit_cube(o, d, h=0.8):  # [-h, h] x [0, 2h] x [-h, h], the slab method
    lo, hi = torch.tensor([[-h], [0.0], [-h]]), torch.tensor([[h], [2 * h], [h]])
    t1, t2 = (lo - o) / d, (hi - o) / d  # division by 0 gives +-inf, which the slab test handles
    t_near, axis = torch.minimum(t1, t2).max(0)
    t_far = torch.maximum(t1, t2).min(0).values
    t = torch.where((t_near <= t_far) & (t_near > 0), t_near, math.inf)
    n = torch.zeros_like(d).scatter_(0, axis[None], -torch.sign(d).gather(0, axis[None]))  # face we entered
    return t, n


def _hit_cylinder(o, d, r=0.8, h=1.7):  # vertical axis, radius r, from y=0 to y=h
    (ox, oy, oz), (dx, dy, dz) = o, d
    a, b, c = dx * dx + dz * dz, ox * dx + oz * dz, ox * ox + oz * oz - r * r
    disc = b * b - a * c
    t_side = (-b - disc.clamp_min(0).sqrt()) / a
    y = oy + t_side * dy
    t_side = torch.where((disc >= 0) & (t_side > 0) & (y >= 0) & (y <= h), t_side, math.inf)
    t_cap = (h - oy) / dy  # the top disc; the bottom one lies on the ground and is never seen
    cx, cz = ox + t_cap * dx, oz + t_cap * dz
    t_cap = torch.where((t_cap > 0) & (cx * cx + cz * cz <= r * r), t_cap, math.inf)
    side = t_side <= t_cap
    ts = t_side.clamp_max(1e6)
    n = torch.stack([torch.where(side, ox + ts * dx, 0.0), (~side).float(), torch.where(side, oz + ts * dz, 0.0)])
    return torch.minimum(t_side, t_cap), n


def _hit_cone(o, d, r=1.0, h=2.0):  # base radius r on y=0, apex at y=h: x^2+z^2 = (k(h-y))^2
    (ox, oy, oz), (dx, dy, dz) = o, d
    k2, hy = (r / h) ** 2, h - oy
    a = dx * dx + dz * dz - k2 * dy * dy
    b = ox * dx + oz * dz + k2 * hy * dy
    c = ox * ox + oz * oz - k2 * hy * hy
    disc = b * b - a * c
    s = disc.clamp_min(0).sqrt()
    t0, t1 = (-b - s) / a, (-b + s) / a
    t0, t1 = torch.minimum(t0, t1), torch.maximum(t0, t1)

    def valid(t):  # a root counts if it is ahead and on the lower half of the double cone
        y = oy + t * dy
        return (disc >= 0) & (t > 0) & (y >= 0) & (y <= h)
    t = torch.where(valid(t0), t0, torch.where(valid(t1), t1, math.inf))
    tc = t.clamp_max(1e6)
    return t, torch.stack([ox + tc * dx, k2 * (hy - tc * dy), oz + tc * dz])


_HITTERS = (_hit_sphere, _hit_cube, _hit_cylinder, _hit_cone)
# bounding sphere of each unit shape: (centre height, radius); used to skip rays that miss
_BOUNDS = torch.tensor([[1.0, 1.0], [0.8, 0.8 * 3**0.5], [0.85, (0.8**2 + 0.85**2) ** 0.5], [0.75, 1.25]])
# upright bounding box of each unit shape: (half width, height); tighter than the sphere for cubes
_EXTENTS = torch.tensor([[1.0, 2.0], [0.8, 1.6], [0.8, 1.7], [1.0, 2.0]])

# -----------------------------------------------------------------------------
# Scene layout: one row of random numbers per image -> batched scene parameters.

def sample_scenes(indices, seed=0, config=SceneConfig()):
    """Lay out the scenes of a batch of image indices, without rendering: a dict of (B, ...) tensors,
    including the labels: shape (the main object's), count (number of distractors = objects - 1) and
    distance (bucket of the distance from the camera to the nearest object's centre, `nearest`)."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    B, D = len(indices), config.max_distractors
    u = _Draws(_uniforms(indices, seed, 36 + 8 * D))                  # exactly the draws made below
    M = 1 + D  # object slots; slot 0 is the main object

    # camera: random height and direction, aimed near the main object but never at a class-dependent spot
    azimuth, elev = u.next(0, 2 * math.pi), torch.deg2rad(u.next(*config.camera_elevation))
    dist = u.next(*config.camera_distance)
    aim = torch.stack([u.next(-0.5, 0.5), u.next(0.4, 1.2), u.next(-0.5, 0.5)], -1)  # (B, 3)
    back = torch.stack([elev.cos() * azimuth.sin(), elev.sin(), elev.cos() * azimuth.cos()], -1)
    cam = aim + dist[:, None] * back
    # directional light from a random direction above the horizon; ambient term
    l_az, l_el = u.next(0, 2 * math.pi), torch.deg2rad(u.next(25, 70))
    light = torch.stack([l_el.cos() * l_az.sin(), l_el.sin(), l_el.cos() * l_az.cos()], -1)
    ambient = u.next(0.25, 0.45)

    # objects: the main one near the origin; distractors on a ring around it, in distinct sectors 60 and
    # 120 degrees either side of the line of sight (never straight in front of or behind the main object,
    # so they rarely hide it or hide behind it); sectors and ring keep default-sized objects apart
    n_extra = (u.next() * (D + 1)).long().clamp_max(D)            # (B,) number of distractors
    kind = (u.next(k=M) * len(SHAPES)).long().clamp_max(len(SHAPES) - 1)  # (B, M) same law per slot
    lo, hi = config.main_size
    scale = torch.cat([u.next(lo, hi, k=1), u.next(*config.distractor_size, k=D)], 1)
    yaw = u.next(0, 2 * math.pi, k=M)
    sector = u.next(k=4).argsort(1)[:, :D]                        # (B, D) distinct sectors
    angle = azimuth[:, None] + torch.deg2rad(torch.tensor([60.0, 120.0, 240.0, 300.0])[sector] + u.next(-10, 10, k=D))
    ring = u.next(2.5, 3.0, k=D)
    pos = torch.zeros(B, M, 3)
    pos[:, 0, 0], pos[:, 0, 2] = u.next(-0.25, 0.25), u.next(-0.25, 0.25)
    pos[:, 1:, 0], pos[:, 1:, 2] = ring * angle.sin(), ring * angle.cos()
    alive = torch.arange(M)[None, :] <= n_extra[:, None]          # (B, M)
    # colours: one law for every shape and slot, so colour says nothing about the class
    hue = u.next(k=M)                                                  # (B, M) in [0, 1)
    colour = _hsv(hue.flatten(), u.next(0.45, 0.9, k=M).flatten(), u.next(0.55, 0.95, k=M).flatten()).view(B, M, 3)

    ground = _hsv(u.next(), u.next(0.0, 0.3), u.next(0.35, 0.7))
    horizon = _hsv(u.next(), u.next(0.0, 0.2), u.next(0.75, 0.95))
    zenith = _hsv(u.next(0.5, 0.7), u.next(0.3, 0.6), u.next(0.6, 0.9))
    checker = torch.stack([u.next(0.5, 1.2), u.next(*config.checker_contrast)], -1)  # cell size, contrast
    jitter = 1 + config.colour_jitter * u.next(-1, 1, k=2)             # brightness, contrast
    noise_at = (u.next() * 2**20).long()                               # offset into the noise bank

    bounds = _BOUNDS[kind]                                             # (B, M, 2)
    bcentre = pos + torch.stack([torch.zeros_like(scale), bounds[..., 0] * scale, torch.zeros_like(scale)], -1)
    near = torch.where(alive, (bcentre - cam[:, None]).norm(dim=-1), math.inf).min(1).values
    return dict(cam=cam, aim=aim, light=light, ambient=ambient, kind=kind, scale=scale, yaw=yaw, pos=pos,
                alive=alive, hue=hue, colour=colour, bcentre=bcentre, bradius=bounds[..., 1] * scale,
                ground=ground, horizon=horizon, zenith=zenith, checker=checker, jitter=jitter,
                noise_at=noise_at, shape=kind[:, 0].clone(), count=n_extra, nearest=near,
                distance=torch.bucketize(near, torch.tensor(config.distance_edges)))

# The causes of a scene, as continuous labels for the factor probe (evaluation/factors.py): what a
# frozen encoder's features say about how the scene was made, beyond the three class labels.
FACTORS = ("camera_height", "camera_distance", "camera_azimuth", "object_row", "object_column", "object_hue",
           "sun_elevation", "sun_azimuth")
# Angles, with the symmetry the image leaves them: the checker ground looks the same every 90 degrees
# of camera azimuth, so only 4 x the azimuth can be read from an image (the factor probe regresses
# (cos k a, sin k a)). The sun's azimuth is the one relative to the camera's, which the shadows show.
ANGLE_SYMMETRY = {"camera_azimuth": 4, "object_hue": 1, "sun_azimuth": 1}


def scene_factors(layout: dict, masks: torch.Tensor) -> dict:
    """The causes of N scenes from their layout (`sample_scenes`) and main-object masks (N, H, W):
    {name in FACTORS: (N,) float64}. Camera height above the ground and distance from its aim point
    in scene units; angles in radians (camera azimuth in the world, the main object's hue as an
    angle, the sun's elevation and its azimuth relative to the camera's); the main object's place in
    the image as the centroid of its mask, a fraction of the image's height or width (NaN where the
    object is hidden)."""
    back = (layout["cam"] - layout["aim"]).double()  # (N, 3) from the aim point to the camera
    light = layout["light"].double()
    camera_azimuth = torch.atan2(back[:, 0], back[:, 2])
    sun_azimuth = torch.atan2(light[:, 0], light[:, 2])
    weight = masks.double()  # (N, H, W)
    area = weight.sum((1, 2))
    rows = (torch.arange(masks.shape[1], dtype=torch.float64) + 0.5) / masks.shape[1]
    cols = (torch.arange(masks.shape[2], dtype=torch.float64) + 0.5) / masks.shape[2]
    hidden = area == 0
    centroid_row = torch.where(hidden, torch.nan, (weight.sum(2) * rows).sum(1) / area.clamp(min=1))
    centroid_col = torch.where(hidden, torch.nan, (weight.sum(1) * cols).sum(1) / area.clamp(min=1))
    return {"camera_height": layout["cam"][:, 1].double(), "camera_distance": back.norm(dim=1),
            "camera_azimuth": camera_azimuth, "object_row": centroid_row, "object_column": centroid_col,
            "object_hue": 2 * math.pi * layout["hue"][:, 0].double(), "sun_elevation": torch.asin(light[:, 1]),
            "sun_azimuth": torch.remainder(sun_azimuth - camera_azimuth, 2 * math.pi)}

# -----------------------------------------------------------------------------
# The ray caster. Rays are only tested against an object where they can possibly hit it: inside the
# pixel box that holds the object's bounding sphere on screen. That keeps the exact tests to a few
# hundred rays per object instead of every pixel times every object.

def _screen_boxes(centre, r, H, W, f):
    """Bounding spheres, centre (..., 3) in the camera frame, radius r (...) -> inclusive pixel boxes
    (row0, row1, col0, col1), each (...) int64. Spheres reaching behind the camera get the whole image."""
    x, y, z = centre.unbind(-1)

    def extent(a):  # the two rays from the camera tangent to the circle of radius r around (a, z)
        angle, half = torch.atan2(a, z), torch.asin((r / torch.hypot(a, z)).clamp(max=1))
        return torch.tan(angle - half), torch.tan(angle + half)
    (x0, x1), (y0, y1) = extent(x), extent(y)
    behind = z <= r * 1.001
    row0 = torch.where(behind, 0, torch.floor(H / 2 - 0.5 - f * y1)).long().clamp(0, H)
    row1 = torch.where(behind, H - 1, torch.ceil(H / 2 - 0.5 - f * y0)).long().clamp(-1, H - 1)
    col0 = torch.where(behind, 0, torch.floor(W / 2 - 0.5 + f * x0)).long().clamp(0, W)
    col1 = torch.where(behind, W - 1, torch.ceil(W / 2 - 0.5 + f * x1)).long().clamp(-1, W - 1)
    return row0, row1, col0, col1


def _corners(sc):
    """(B, M, 8, 3): the world corners of each object's upright bounding box."""
    half, height = (_EXTENTS[sc["kind"]] * sc["scale"][..., None]).unbind(-1)    # (B, M)
    sx, sz = torch.tensor([1.0, 1, -1, -1] * 2), torch.tensor([1.0, -1, 1, -1] * 2)
    x, y, z = sx * half[..., None], torch.tensor([0.0] * 4 + [1.0] * 4) * height[..., None], sz * half[..., None]
    cos, sin = sc["yaw"].cos()[..., None], sc["yaw"].sin()[..., None]  # turn by +yaw, as the objects are
    return torch.stack([cos * x + sin * z, y, cos * z - sin * x], -1) + sc["pos"][:, :, None]


def _points_boxes(points, H, W, f):
    """Points (B, M, K, 3) in the camera frame -> pixel boxes (row0, row1, col0, col1), each (B, M),
    holding their projections, so also their convex hull (the whole image if one is behind the camera)."""
    x, y, z = points.unbind(-1)
    behind = (z < 1e-3).any(-1)
    u, v = f * x / z.clamp_min(1e-3), f * y / z.clamp_min(1e-3)
    row0 = torch.where(behind, 0, torch.floor(H / 2 - 0.5 - v.amax(-1))).long().clamp(0, H)
    row1 = torch.where(behind, H - 1, torch.ceil(H / 2 - 0.5 - v.amin(-1))).long().clamp(-1, H - 1)
    col0 = torch.where(behind, 0, torch.floor(W / 2 - 0.5 + u.amin(-1))).long().clamp(0, W)
    col1 = torch.where(behind, W - 1, torch.ceil(W / 2 - 0.5 + u.amax(-1))).long().clamp(-1, W - 1)
    return row0, row1, col0, col1


def _union(a, b):
    return torch.minimum(a[0], b[0]), torch.maximum(a[1], b[1]), torch.minimum(a[2], b[2]), torch.maximum(a[3], b[3])


def _intersection(a, b):
    return torch.maximum(a[0], b[0]), torch.minimum(a[1], b[1]), torch.maximum(a[2], b[2]), torch.minimum(a[3], b[3])


def _box_pixels(row0, row1, col0, col1, alive, kind, W, P):
    """(B, M) pixel boxes -> one entry per pixel of each live object's box: which object, as a column
    b*M + m of the object table (N,), and which ray, b*P + pixel (N,). Entries come grouped by the
    object's shape, so that each shape's exact test later works on one contiguous slice."""
    # int32 throughout: indexing accepts it, and int64 division is several times slower
    h, w = (row1 - row0 + 1).clamp_min(0).int(), (col1 - col0 + 1).clamp_min(0).int()
    area = torch.where(alive, h * w, 0).flatten()                         # (B*M,)
    order = torch.argsort(kind.flatten(), stable=True).int()              # boxes grouped by shape
    owner = torch.repeat_interleave(order, area[order])                   # (N,)
    start = area[order].cumsum(0, dtype=torch.int32) - area[order]        # first entry of each box
    offset = torch.arange(len(owner), dtype=torch.int32) - torch.repeat_interleave(start, area[order])
    # the k-th pixel of a box is at row k // w, column k % w: ray = top-left ray + k + (k // w) * (W - w)
    first = (torch.arange(len(alive))[:, None] * P + row0 * W + col0).int().flatten()
    skip = (W - w).flatten().index_select(0, owner)
    ray = offset.floor_divide(w.flatten().index_select(0, owner)).mul_(skip).add_(offset).add_(first.index_select(0, owner))
    return owner, ray


def _object_table(sc):
    """(11, B*M): one column per object: bounding sphere (centre, radius), position, cos and sin of
    yaw, scale, shape index. Column b*M + m is object m of image b."""
    return torch.cat([sc["bcentre"], sc["bradius"][..., None] * 1.01 + 1e-3, sc["pos"], sc["yaw"].cos()[..., None],
                      sc["yaw"].sin()[..., None], sc["scale"][..., None], sc["kind"][..., None].float()], -1).flatten(0, 1).T


def _hit_objects(table, owner, o, d, normals=True):
    """Hits of rays o + t*d, (3, N), |d| = 1, with the objects in columns `owner` (N,) of the object table
    -> t (N,) (inf = miss) and unit world normals (3, N) (zero where missed; None if normals=False)."""
    N = len(owner)
    # cheap test first: does the ray pass through the bounding sphere? Only those get the exact test.
    sphere = table[:4].index_select(1, owner)
    w = sphere[:3].sub_(o)                                                # ray origin -> sphere centre
    along = (w * d).sum(0)
    near = ((w * w).sum(0).sub_(along * along) < sphere[3] ** 2) & (along > -sphere[3])
    near = near.nonzero().squeeze(1)
    px, py, pz, cos, sin, s, kind = table[4:].index_select(1, owner.index_select(0, near))
    o, d = o.index_select(1, near), d.index_select(1, near)

    def to_local(x, y, z):  # rotate by -yaw about y, then scale down; t stays a world distance
        return torch.stack([cos * x - sin * z, y, sin * x + cos * z]).div_(s)
    o, d = to_local(o[0] - px, o[1] - py, o[2] - pz), to_local(*d)
    # rays come grouped by shape (see _box_pixels): one slice per shape, a loop over 4 shapes
    sizes = torch.bincount(kind.long(), minlength=len(SHAPES)).tolist()
    hits = [hit(o_k, d_k) for hit, o_k, d_k in zip(_HITTERS, o.split(sizes, 1), d.split(sizes, 1))]
    t, n = torch.cat([h[0] for h in hits]), torch.cat([h[1] for h in hits], 1)
    t_all = torch.full((N,), math.inf).index_copy_(0, near, t)
    if not normals:
        return t_all, None
    n = torch.stack([cos * n[0] + sin * n[2], n[1], cos * n[2] - sin * n[0]])
    n = n.div_((n * n).sum(0).sqrt_().clamp_min_(1e-12))
    return t_all, torch.zeros(3, N).index_copy_(1, near, n)


@functools.lru_cache(maxsize=1)
def _noise_bank():
    """A fixed bank of Gaussian noise; each image reads a slice at its own random offset."""
    return torch.randn(2**20 + 3 * 256 * 256, generator=torch.Generator().manual_seed(1234))


REGIONS = ("sky", "ground", "main object", "distractor")  # render_scenes()'s region codes 0-3
MAIN_OBJECT = REGIONS.index("main object")


def patch_regions(regions, patch_size):
    """Region maps (N, H, W) of codes into REGIONS -> (N, h, w): what each patch shows, the code of
    most of its pixels (ties: the lower code). The one definition of "this patch shows the main
    object" (== MAIN_OBJECT), used by the predictor's retrieval and the token-energy study alike."""
    N, H, W = regions.shape
    codes = M.patchify(regions[:, None].long(), patch_size)  # (N, h*w, p*p)
    counts = F.one_hot(codes, len(REGIONS)).sum(2)  # (N, h*w, regions)
    return counts.argmax(2).reshape(N, H // patch_size, W // patch_size)  # argmax keeps the first of equal counts


def render_scenes(indices, height, width, seed=0, config=SceneConfig()):
    """Render images `indices` of the scene dataset at height x width. Returns a dict with image (B,3,H,W)
    float32 in [0,1], depth (B,H,W) float32 (distance along the camera axis; sky = SKY_DEPTH),
    mask (B,H,W) bool (main-object pixels), region (B,H,W) uint8 (what each pixel shows, an index into
    REGIONS), shape, count, distance (B,) int64."""
    H, W = _check_resolution((height, width))
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) == 0 or indices.min() < 0:
        raise ValueError(f"indices must be a non-empty list of non-negative ints, got {indices}")
    return _render(sample_scenes(indices, seed, config), H, W, config)


# Per-pixel vectors are stored component-major, (3, B, P) with P = H*W, so that every operation runs
# over long contiguous rows and a list of candidate rays is gathered with one index_select on (3, B*P).
# Per-pixel masks are float 0/1 combined by arithmetic: on the CPU, torch's where(), masked_fill_()
# and bool logic are several times slower than a multiply. Many updates are in place (mul_, add_...):
# a fresh multi-megabyte tensor costs page faults, which can take longer than the arithmetic itself.

@torch.no_grad()
def _render(sc, H, W, config):
    """The ray caster proper: scene layout (sample_scenes) -> render_scenes() output."""
    f, grid, axes, dirs = _camera_rays(sc, H, W, config.fov)

    def to_camera(points):  # (B, ..., 3) world -> camera frame
        flat = points.reshape(len(points), -1, 3)
        return ((flat - sc["cam"][:, None]) @ axes.transpose(1, 2)).view(points.shape)

    def sphere_boxes(centres, r):  # spheres (B, M, 3) in the world -> their pixel boxes
        return _screen_boxes(to_camera(centres), r, H, W, f)

    # primary rays: the nearest object, else the ground plane y = 0 (objects stand on it), else the sky
    table, r = _object_table(sc), sc["bradius"] * 1.01 + 1e-3
    corners = _corners(sc)                                                # (B, M, 8, 3)
    boxes = _intersection(sphere_boxes(sc["bcentre"], r), _points_boxes(to_camera(corners), H, W, f))
    t, obj, normal = _nearest_objects(sc, table, dirs, boxes, W)
    dy = dirs[1]                                                          # (B, P)
    on_obj = (obj >= 0).float()
    on_ground = (dy < 0).float().sub_(on_obj).clamp_min_(0)
    sky = 1 - on_obj - on_ground
    t = torch.minimum(t, sc["cam"][:, 1, None] / dy.clamp_max(-1e-6).neg())  # upward rays: ground ~1e6 away
    normal[1].add_(on_ground)                                             # the ground's normal is +y

    # Lambert shading with exact shadows. Object m can only shadow points inside its bounding sphere
    # swept away from the light down to the ground (a capsule) and inside its bounding box swept the
    # same way (the hull of its corners and their shadows on the ground): candidates lie in both boxes.
    lambert = (normal * sc["light"].T[..., None]).sum(0).clamp_min_(0)   # (B, P); 0 on the sky
    if config.shadows:
        light = sc["light"][:, None]                                      # (B, 1, 3)
        end = sc["bcentre"] - ((sc["bcentre"][..., 1] + r) / light[..., 1])[..., None] * light
        capsule = _union(sphere_boxes(sc["bcentre"], r), sphere_boxes(end, r))
        dropped = corners - (corners[..., 1:2] / light[..., None, 1:2]) * light[:, :, None]  # along -light to y = 0
        swept = _points_boxes(to_camera(torch.cat([corners, dropped], 2)), H, W, f)
        boxes = _intersection(capsule, swept)
        lambert.view(-1)[_shadowed(sc, table, boxes, W, axes, grid, dirs, t, normal, lambert, obj)] = 0.0
    ambient = sc["ambient"][:, None]
    shade = lambert.mul_(1 - ambient).add_(ambient)                       # (B, P)

    image = _colour(sc, dirs, t, obj, on_obj, on_ground, sky, shade, config.noise)
    depth = (t * grid[2]).clamp_max_(SKY_DEPTH)                          # sky (and far ground) -> SKY_DEPTH
    region = on_ground + 2 * (obj == 0).float() + 3 * (obj > 0).float()   # indices into REGIONS
    return dict(image=image.view(-1, 3, H, W), depth=depth.view(-1, H, W), mask=(obj == 0).view(-1, H, W),
                region=region.to(torch.uint8).view(-1, H, W),
                shape=sc["shape"], count=sc["count"], distance=sc["distance"])


def _camera_rays(sc, H, W, fov):
    """-> focal length f in pixels, the pixel grid (3, P) (unit vectors in the camera frame), camera axes
    (B, 3, 3) (rows right, up, forward, in world coordinates) and world ray directions (3, B, P)."""
    B = len(sc["cam"])
    f = (min(H, W) / 2) / math.tan(math.radians(fov) / 2)
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5 - H / 2, torch.arange(W) + 0.5 - W / 2, indexing="ij")
    grid = F.normalize(torch.stack([xs / f, -ys / f, torch.ones(H, W)]).view(3, H * W), dim=0)
    fwd = F.normalize(sc["aim"] - sc["cam"], dim=-1)
    right = F.normalize(torch.cross(fwd, torch.tensor([0.0, 1.0, 0.0]).expand(B, 3), dim=-1), dim=-1)
    axes = torch.stack([right, torch.cross(right, fwd, dim=-1), fwd], 1)
    return f, grid, axes, _turn(axes.transpose(1, 2), grid)


def _turn(rotation, grid):
    """(B, 3, 3) rotations applied to one (3, P) set of vectors -> (3, B, P), in one matrix product."""
    return (rotation.permute(1, 0, 2).reshape(-1, 3) @ grid).view(3, len(rotation), -1)


def _nearest_objects(sc, table, dirs, boxes, W):
    """Primary rays against the objects -> ray length (B, P) (inf = no object), object slot (B, P) int32
    (-1 = none) and unit normals (3, B, P) (zero off objects)."""
    (B, M), P = sc["kind"].shape, dirs.shape[2]
    owner, ray = _box_pixels(*boxes, sc["alive"], sc["kind"], W, P)
    t, n = _hit_objects(table, owner, sc["cam"].T.index_select(1, owner // M), dirs.view(3, -1).index_select(1, ray))
    t_obj = torch.full((B * P,), math.inf).scatter_reduce_(0, ray, t, "amin")
    win = ((t == t_obj.index_select(0, ray)) & (t < math.inf)).nonzero().squeeze(1)
    ray, owner = ray.index_select(0, win).long(), owner.index_select(0, win)
    obj = torch.full((B * P,), -1, dtype=torch.int32).index_copy_(0, ray, owner % M)
    normal = torch.zeros(3, B * P).index_copy_(1, ray, n.index_select(1, win))
    return t_obj.view(B, P), obj.view(B, P), normal.view(3, B, P)


def _shadowed(sc, table, boxes, W, axes, grid, dirs, t, normal, lambert, obj):
    """Shadow rays from lit surface points towards the light, for the pixels in each object's shadow
    box -> the pixels (int64, b*P + p) whose ray hits an object."""
    (B, M), P = sc["kind"].shape, t.shape[1]
    owner, ray = _box_pixels(*boxes, sc["alive"], sc["kind"], W, P)
    keep = (lambert > 0).view(-1).index_select(0, ray) & (obj.view(-1).index_select(0, ray) != owner % M)
    keep = keep.nonzero().squeeze(1)                                      # lit (so not sky), not itself
    owner, ray = owner.index_select(0, keep), ray.index_select(0, keep)
    # Most of these rays miss. In the light's frame (e1, e2, light) a shadow ray is a point, so a cheap
    # 2-D test drops every ray that passes further than r from the bounding sphere's centre.
    light = sc["light"]                                                   # (B, 3), towards the light
    e1 = F.normalize(torch.cross(light, torch.tensor([0.0, 1.0, 0.0]).expand(B, 3), dim=-1), dim=-1)
    frame = torch.stack([e1, torch.cross(light, e1, dim=-1), light], 1)  # (B, 3, 3)
    points = _turn(frame @ axes.transpose(1, 2), grid).mul_(t).add_((frame @ sc["cam"][..., None]).transpose(0, 1))
    centres = (sc["bcentre"] @ frame.transpose(1, 2)).flatten(0, 1).T    # (3, B*M), light frame
    p, c = points.view(3, -1).index_select(1, ray), centres.index_select(1, owner)
    r = table[3].index_select(0, owner)
    near = (((p[:2] - c[:2]).square_().sum(0) < r * r) & (c[2] - p[2] > -r)).nonzero().squeeze(1)
    owner, ray = owner.index_select(0, near), ray.index_select(0, near)
    # the exact test, from just off the surface
    b = owner // M
    start = sc["cam"].T.index_select(1, b).addcmul_(dirs.view(3, -1).index_select(1, ray), t.view(-1).index_select(0, ray))
    start.add_(normal.view(3, -1).index_select(1, ray), alpha=1e-3)
    t_shadow, _ = _hit_objects(table, owner, start, light.T.index_select(1, b), normals=False)
    return ray[t_shadow < math.inf].long()


def _colour(sc, dirs, t, obj, on_obj, on_ground, sky, shade, noise):
    """Every pixel is a mix of a few per-image colours: its object's colour, or the ground's (times a
    checker whose contrast fades with distance, so that far cells do not alias) fading into the horizon
    colour, or the sky's blend of horizon and zenith. So: colours (B, 3, M+3) @ weights (B, M+3, P).
    Then a per-image contrast and brightness jitter about the mean, and pixel noise -> (B, 3, P)."""
    (B, M), P = sc["kind"].shape, t.shape[1]
    cam = sc["cam"].T[..., None]                                          # (3, B, 1)
    ground_t = t * on_ground                                              # ray length, 0 off the ground
    cell, contrast = sc["checker"][:, :1], sc["checker"][:, 1:]          # (B, 1)
    u = (dirs[0] * ground_t).add_(cam[0]).div_(cell).floor_()            # checker cell indices
    v = (dirs[2] * ground_t).add_(cam[2]).div_(cell).floor_()
    cells = u.add_(v)
    checker = cells.mul(0.5).floor_().mul_(4).sub_(cells, alpha=2).add_(1)  # 1 - 2 * (cells mod 2): +1 / -1
    checker.mul_(contrast).mul_(torch.exp(ground_t * (-1 / 12))).add_(1)
    fog = torch.exp(ground_t * (-1 / 40))                                 # 1 near, 0 far away
    up = dirs[1].clamp(0, 1).sqrt_()                                      # sky gradient
    weights = torch.empty(B, M + 3, P)
    weights[:, :M].zero_()
    weights.scatter_(1, obj.clamp_min(0)[:, None], (shade * on_obj)[:, None])  # object m: its colour
    torch.mul(checker.mul_(fog).mul_(shade), on_ground, out=weights[:, M])     # ground
    torch.addcmul(fog.neg_().add_(1).mul_(on_ground), sky, 1 - up, out=weights[:, M + 1])  # horizon
    torch.mul(up, sky, out=weights[:, M + 2])                             # zenith
    colours = torch.cat([sc["colour"], sc["ground"][:, None], sc["horizon"][:, None], sc["zenith"][:, None]], 1)

    bright, contr = sc["jitter"][:, 0, None], sc["jitter"][:, 1, None]   # (B, 1)
    mean = (colours * weights.mean(2)[..., None]).sum(1).mean(1, keepdim=True)  # (B, 1) mean pixel value
    colours = (contr[..., None] * colours).transpose(1, 2)               # (B, 3, M+3)
    if noise > 0:  # each image reads its own slice of a fixed noise bank
        bank = _noise_bank()
        image = torch.stack([bank[i:i + 3 * P] for i in sc["noise_at"].tolist()]).view(B, 3, P)
        image = torch.baddbmm(image, colours, weights, beta=noise)
    else:
        image = torch.bmm(colours, weights)
    return image.add_(((bright - contr) * mean)[..., None]).clamp_(0, 1)


# -----------------------------------------------------------------------------
# The scene dataset: fixed images, rendered lazily in chunks and kept in memory

class SceneDataset(Dataset):
    """num_images scene images of one split. Items: image (3,H,W) float in [0,1], label (= shape), shape,
    count, distance (ints), depth (H,W) float, mask (H,W) bool, region (H,W) uint8. Chunks of `chunk`
    images are rendered on first use and cached (images as uint8, depth as float16), so use
    num_workers=0 in a DataLoader.
    A chunk holds about a million pixels (256 images at 64 px) unless `chunk` says otherwise."""

    def __init__(self, num_images, resolution=64, split="train", seed=0, config=SceneConfig(), chunk=None):
        if not isinstance(num_images, (int, np.integer)) or not 0 < num_images <= 10**9:
            raise ValueError(f"num_images must be a positive int (at most 10**9), got {num_images!r}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: choose one of {SPLITS}")
        self.height, self.width = _check_resolution(resolution)
        self.num_images, self.split, self.seed, self.config = num_images, split, seed, config
        self.chunk = chunk or max(16, min(256, 2**20 // (self.height * self.width)))
        self.classes = SHAPES
        self._cache = {}

    def __len__(self):
        return self.num_images

    def _chunk(self, c):
        if c not in self._cache:
            lo, hi = c * self.chunk, min(self.num_images, (c + 1) * self.chunk)
            out = render_scenes(np.arange(lo, hi) + SPLIT_OFFSET[self.split], self.height, self.width, self.seed, self.config)
            out["image"] = (out["image"] * 255).round().to(torch.uint8)   # 4x less memory than float32
            out["depth"] = out["depth"].half()
            self._cache[c] = out
        return self._cache[c]

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        out, j = self._chunk(i // self.chunk), i % self.chunk
        shape = int(out["shape"][j])
        return dict(image=out["image"][j].float() / 255, label=shape, shape=shape, count=int(out["count"][j]),
                    distance=int(out["distance"][j]), depth=out["depth"][j].float(), mask=out["mask"][j],
                    region=out["region"][j])

    def tensors(self, label="shape"):
        """Every image at once, for probes: images (N, 3, H, W) float in [0, 1], labels (N,) int64."""
        _check_label(label)
        chunks = [self._chunk(c) for c in range((len(self) + self.chunk - 1) // self.chunk)]
        return torch.cat([c["image"] for c in chunks]).float() / 255, torch.cat([c[label] for c in chunks])

    def depths(self):
        """Every depth map at once: (N, H, W) float32 (sky = SKY_DEPTH)."""
        return self._every("depth").float()

    def regions(self):
        """Every region map at once: (N, H, W) uint8, indices into REGIONS."""
        return self._every("region")

    def masks(self):
        """Every main-object mask at once: (N, H, W) bool, True on the main object's pixels."""
        return self._every("mask").bool()

    def factors(self):
        """The causes of every scene (`scene_factors`): {name in FACTORS: (N,) float64}."""
        indices = np.arange(len(self)) + SPLIT_OFFSET[self.split]
        return scene_factors(sample_scenes(indices, self.seed, self.config), self.masks())

    def _every(self, key):
        return torch.cat([self._chunk(c)[key] for c in range((len(self) + self.chunk - 1) // self.chunk)])

# -----------------------------------------------------------------------------
# Normalisation with the ImageNet statistics (what pre-trained ViTs expect; fine for scratch too)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images):
    """(B, 3, H, W) or (3, H, W) in [0, 1] -> zero-mean, unit-std channels."""
    mean, std = (torch.tensor(v).view(3, 1, 1).to(images) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (images - mean) / std


def denormalize(images):
    """Inverse of normalize(), clamped to [0, 1] for pictures."""
    mean, std = (torch.tensor(v).view(3, 1, 1).to(images) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (images * std + mean).clamp(0, 1)


class RandomShiftFlip:
    """Training-time augmentation of one image (C, H, W): a translation by up to `shift` pixels in
    each direction (the border pixels repeat into the gap, so no artificial edge appears), and with
    `flip` a left-right mirror half of the time. I-JEPA needs no augmentation to define its task;
    on a few thousand real images it is there to make each epoch show slightly different images.
    The draws come from the generator it is given: packing.BatchStream passes its seeded one, so a
    seed reproduces every image and a resumed run sees the same ones."""

    def __init__(self, shift: int = 0, flip: bool = False):
        if shift < 0:
            raise ValueError(f"shift must be 0 or more pixels, got {shift}")
        self.shift, self.flip = shift, flip

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.flip and torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        s = self.shift
        if s:
            height, width = image.shape[-2:]
            top, left = torch.randint(0, 2 * s + 1, (2,), generator=generator).tolist()
            padded = F.pad(image[None], (s, s, s, s), mode="replicate")[0]  # (C, H + 2s, W + 2s)
            image = padded[:, top:top + height, left:left + width]        # moved by (s - top, s - left)
        return image

# -----------------------------------------------------------------------------
# Real datasets. All return the same item dicts: image (3, H, W) float in [0, 1] at the requested
# resolution (scaled so it covers H x W, then centre-cropped), label int (-1 when there is none).

class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing: the message says which files, where, and how to get them."""


def _fit(image, height, width):
    """(C, h, w) float -> (C, height, width): scale (antialiased) to cover, then centre-crop."""
    h, w = image.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        image = image[:, top:top + height, left:left + width]
    return image


class ArrayImages(Dataset):
    """Images held in memory as uint8 (N, 3, h, w) with integer labels (N,), resized on access."""

    def __init__(self, images, labels, resolution=64, classes=(), depths=None):
        self.images, self.labels, self.depths = images, torch.as_tensor(labels, dtype=torch.long), depths
        self.height, self.width = _check_resolution(resolution)
        self.classes = tuple(classes)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        item = dict(image=_fit(torch.as_tensor(self.images[i]).float() / 255, self.height, self.width).clamp(0, 1),
                    label=int(self.labels[i]))
        if self.depths is not None:
            item["depth"] = _fit(torch.as_tensor(self.depths[i])[None].float(), self.height, self.width)[0]
        return item


def _torchvision(name, load, root, folder, files, fetch):
    """Load a torchvision dataset, or raise one clear error naming the missing files and how to get them."""
    missing = [f for f in files if not os.path.isfile(os.path.join(root, folder, f))]
    fix = f"put them in {os.path.abspath(os.path.join(root, folder))!r} (root={root!r}), or with internet run:\n  {fetch}"
    if missing:
        raise DatasetNotFoundError(f"{name} not found: missing {', '.join(missing)}; " + fix)
    try:
        return load()
    except RuntimeError as e:  # torchvision's md5 check failed: corrupt or partial files
        raise DatasetNotFoundError(f"{name} files failed torchvision's check ({e}); delete them and " + fix) from e


def stl10(split="train", resolution=64, root="data"):
    """STL-10, 96 px: 'train' (5k labelled), 'test' (8k) or 'unlabeled' (100k, label -1)."""
    import torchvision
    if split not in ("train", "test", "unlabeled"):
        raise ValueError(f"unknown STL-10 split {split!r}: choose 'train', 'test' or 'unlabeled'")
    fetch = f"python -c \"import torchvision; torchvision.datasets.STL10({root!r}, split='train', download=True)\""
    base = _torchvision("STL-10", lambda: torchvision.datasets.STL10(root, split=split), root, "stl10_binary",
                        ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"], fetch)
    return ArrayImages(base.data, base.labels, resolution, getattr(base, "classes", ()))


def cifar10(split="train", resolution=64, root="data"):
    """CIFAR-10, 32 px (upscaled to the resolution): 'train' (50k) or 'test' (10k)."""
    import torchvision
    if split not in ("train", "test"):
        raise ValueError(f"unknown CIFAR-10 split {split!r}: choose 'train' or 'test'")
    fetch = f"python -c \"import torchvision; torchvision.datasets.CIFAR10({root!r}, download=True)\""
    base = _torchvision("CIFAR-10", lambda: torchvision.datasets.CIFAR10(root, train=split == "train"), root,
                        "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"], fetch)
    return ArrayImages(base.data.transpose(0, 3, 1, 2), base.targets, resolution, base.classes)  # NHWC -> NCHW


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def _folder_files(root) -> tuple:
    """([(image path, class index)], class names) of a folder with one sub-folder per class; loose
    images in root form one class of their own, named after the folder."""
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f"image folder {root!r} does not exist")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files = [(os.path.join(root, c, f), k) for k, c in enumerate(classes) for f in sorted(os.listdir(os.path.join(root, c)))]
    files += [(os.path.join(root, f), len(classes)) for f in sorted(os.listdir(root))]
    files = [(f, k) for f, k in files if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(f)]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root!r} or its sub-folders")
    if any(k == len(classes) for _, k in files):
        classes.append(os.path.basename(os.path.normpath(root)))
    return files, classes


def _read_rgb(path):
    """A PIL image as RGB: greyscale, palette and CMYK converted, transparency laid over white."""
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        return im.convert("RGB")


@dataclass(frozen=True)
class FolderSummary:
    """What a folder of images shows before anything is trained on it (`describe_folder`)."""
    path: str  # the folder as given
    images: int  # image files in the folder (its train/ sub-folder if it has one)
    side: int  # the median of the images' shorter sides, in pixels, over a sample
    greyscale: bool  # every sampled image has three equal channels once read as RGB


def training_folder(root) -> str:
    """The folder `get_dataset(root, split="train")` reads: root/train if there is one, else root."""
    return os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root


def describe_folder(root, sample: int = 200) -> FolderSummary:
    """Count the training images of a folder and read `sample` of them, evenly spaced over the
    files (so every class is seen): their median shorter side and whether they are all grey."""
    files, _ = _folder_files(training_folder(root))
    sides, grey = [], True
    for path, _ in files[::max(1, len(files) // sample)][:sample]:
        try:
            im = np.asarray(_read_rgb(path))  # (h, w, 3)
        except (OSError, ValueError):  # unreadable: image_folder names such files when it reads the folder
            continue
        sides.append(min(im.shape[:2]))
        grey = grey and bool((im[..., 0] == im[..., 1]).all() and (im[..., 1] == im[..., 2]).all())
    if not sides:
        raise ValueError(f"no readable images in {root!r}: none of the sampled files could be opened as an image")
    return FolderSummary(path=root, images=len(files), side=int(np.median(sides)), greyscale=grey)


def image_folder(root, resolution=64):
    """A folder with one sub-folder of images per class (loose images in root form one class of their own).
    Every image is decoded and resized once, here. Greyscale, palette, CMYK and RGBA become RGB
    (transparency over white); unreadable files are skipped and listed in one warning; images smaller
    than the resolution are upscaled and counted in one warning."""
    height, width = _check_resolution(resolution)
    files, classes = _folder_files(root)
    images, labels, bad, small = [], [], [], 0
    for path, k in files:
        try:
            im = _read_rgb(path)
        except Exception:  # PIL raises several kinds of errors for broken files
            bad.append(os.path.relpath(path, root))
            continue
        small += im.height < height or im.width < width
        pixels = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
        images.append((_fit(pixels, height, width).clamp(0, 1) * 255).round().to(torch.uint8))
        labels.append(k)
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {root!r}: {', '.join(bad)}")
    if small:
        warnings.warn(f"{small} image(s) in {root!r} are smaller than {height}x{width} and were upscaled")
    if not images:
        raise ValueError(f"no readable images in {root!r}")
    dataset = ArrayImages(torch.stack(images), labels, (height, width), classes)
    dataset.num_skipped, dataset.num_upscaled = len(bad), small
    return dataset


def nyu_depth(split="train", resolution=64, root="data"):
    """NYU Depth v2, the 1,449 labelled indoor images with depth in metres (label -1). The .mat file is
    HDF5: 'images' (N, 3, W, H) uint8 and 'depths' (N, W, H) float32, stored transposed. Split: every
    5th image (index % 5 == 0) is 'test', the rest 'train' (a fixed rule, not the official split)."""
    path = os.path.join(root, "nyu_depth_v2_labeled.mat")
    if not os.path.isfile(path):
        raise DatasetNotFoundError(
            f"NYU Depth v2 is not in {os.path.abspath(root)!r}: put 'nyu_depth_v2_labeled.mat' (the 'Labeled "
            f"dataset' file, ~2.8 GB, from the official 'NYU Depth Dataset V2' page) in that folder")
    if split not in ("train", "test"):
        raise ValueError(f"unknown NYU split {split!r}: choose 'train' or 'test'")
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading NYU Depth v2 needs h5py: pip install h5py") from e
    height, width = _check_resolution(resolution)
    images, depths = [], []
    with h5py.File(path, "r") as f:
        n = f["images"].shape[0]
        keep = [i for i in range(n) if (i % 5 == 0) == (split == "test")]
        for i in keep:  # one image at a time: the whole file would not fit in memory comfortably
            image = torch.from_numpy(f["images"][i]).transpose(1, 2).float() / 255       # (3, H, W)
            depth = torch.from_numpy(f["depths"][i]).T.contiguous()[None].float()        # (1, H, W)
            images.append((_fit(image, height, width).clamp(0, 1) * 255).round().to(torch.uint8))
            depths.append(_fit(depth, height, width)[0])
    return ArrayImages(torch.stack(images), [-1] * len(images), (height, width), depths=torch.stack(depths))


DATASETS = ("scenes", "stl10", "cifar10", "nyu")


CLASSIFICATION_DATASETS = ("scenes", "stl10", "cifar10")  # by name; any folder of class sub-folders too


def check_dataset(name):
    """The one check of a --dataset argument, made before anything is loaded: a built-in or named
    classification dataset, or an existing folder. Raises a ValueError that says what to give."""
    if name not in CLASSIFICATION_DATASETS and not os.path.isdir(name):
        raise ValueError(f"--dataset {name!r}: not a known dataset ({', '.join(CLASSIFICATION_DATASETS)}) nor an "
                         f"existing folder; give a folder of images (one sub-folder per class) or one of those names")


def get_dataset(name, split="train", resolution=64, root="data", num_images=None, seed=0):
    """Any dataset by name: 'scenes' (built in, the default), 'stl10', 'cifar10', 'nyu', or a path to a
    folder of images (if it has a sub-folder named like the split, that one is used). num_images takes a
    fixed random subset of a real dataset (chosen with `seed`); for scenes it is the size of the split."""
    if name == "scenes":
        default = {"train": 12_000, "val": 2_000, "test": 2_000}
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: choose one of {SPLITS}")
        return SceneDataset(default[split] if num_images is None else num_images, resolution, split, seed)
    if name == "stl10":
        dataset = stl10(split, resolution, root)
    elif name == "cifar10":
        dataset = cifar10(split, resolution, root)
    elif name == "nyu":
        dataset = nyu_depth(split, resolution, root)
    elif os.path.isdir(name):
        dataset = image_folder(os.path.join(name, split) if os.path.isdir(os.path.join(name, split)) else name, resolution)
    else:
        raise ValueError(f"unknown dataset {name!r}: choose one of {DATASETS} or give the path of an image folder")
    if num_images is not None and num_images < len(dataset):
        pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images]
        dataset = Subset(dataset, pick.tolist())
    return dataset

# -----------------------------------------------------------------------------
# A picture of a few samples


def draw_samples(dataset_or_batch, path="images/scenes_samples.png", n=8):
    """Save a grid of the first n samples: images, and depth and mask rows when present, titled with the
    labels. Accepts a dataset (items are dicts) or a batch dict such as render_scenes() returns."""
    from matplotlib.figure import Figure  # no pyplot: works the same in scripts, tests and notebooks
    if isinstance(dataset_or_batch, dict):
        batch = {k: v[:n] for k, v in dataset_or_batch.items()}
    else:
        items = [dataset_or_batch[i] for i in range(min(n, len(dataset_or_batch)))]
        batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
    n = len(batch["image"])
    rows = ["image"] + [k for k in ("depth", "mask") if k in batch]
    height, width = batch["image"].shape[-2:]
    panel = 1.6 / max(height, width)                                      # inches per pixel
    fig = Figure(figsize=(n * (panel * width + 0.1) + 0.4, len(rows) * (panel * height + 0.15) + 0.45))
    for r, key in enumerate(rows):
        for i in range(n):
            ax = fig.add_subplot(len(rows), n, r * n + i + 1)
            ax.set_xticks([]), ax.set_yticks([])
            if key == "image":
                ax.imshow(batch["image"][i].permute(1, 2, 0).clamp(0, 1).numpy())
                if "shape" in batch:
                    ax.set_title(f"{SHAPES[batch['shape'][i]]}\n{int(batch['count'][i]) + 1} obj, dist {int(batch['distance'][i])}", fontsize=8)
                elif "label" in batch:
                    ax.set_title(f"label {int(batch['label'][i])}", fontsize=8)
            elif key == "depth":  # inverse depth shows near things bright; sky (SKY_DEPTH) is almost black
                ax.imshow((1 / batch["depth"][i].float().clamp_min(0.1)).numpy(), cmap="magma", vmin=0)
            else:
                ax.imshow(batch["mask"][i].numpy(), cmap="gray", vmin=0, vmax=1)
            if i == 0:
                ax.set_ylabel({"image": "image", "depth": "1 / depth", "mask": "main object"}[key], fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
