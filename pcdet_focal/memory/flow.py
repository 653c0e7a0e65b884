"""What flows between module memory rules: activation records, data counts and the report.

Counts are per sample unless said otherwise; a batch of B samples is B times the largest
sample the counts describe (the estimate gates on the worst sample).
"""
from dataclasses import dataclass, field

import numpy as np


class NotModelled(Exception):
    """A module (or a layer inside it) has no memory rule; the estimate cannot be complete."""


@dataclass
class Dense:
    """A (B, C, H, W) activation."""

    t: object          # SymTensor
    b: int
    c: int
    h: int
    w: int

    @property
    def numel(self):
        return self.b * self.c * self.h * self.w

    @property
    def per_sample(self):
        return self.c * self.h * self.w


@dataclass
class Sparse:
    """(N, C) voxel features over the batch, coords (N, 4) [b, z, y, x] in ``spatial`` [D, H, W].

    ``stride`` is (z, y, x) relative to the voxel grid; ``indice_dict`` mimics spconv's cache of
    index pairs per ``indice_key`` (shared by every tensor derived from the input);
    ``frames``: where the voxels of each counted frame are (a list of (n, 3) int64 [z, y, x]
    arrays in this grid), or None when the counts are caps / assumptions."""

    t: object
    n: int
    c: int
    spatial: tuple
    stride: tuple = (1, 1, 1)
    coords: object = None
    indice_dict: dict = field(default_factory=dict)
    frames: object = None

    def like(self, t, c):
        """The same voxels with new features ``t`` of ``c`` channels."""
        return Sparse(t, self.n, c, self.spatial, self.stride, self.coords, self.indice_dict,
                      self.frames)


@dataclass
class Flow:
    """The replay's context: what the previous module handed on, the counts, the report."""

    batch_size: int
    counts: object                 # counts.Counts
    target: str = 'cuda'           # 'cuda' or 'cpu': which kernels' buffers to model
    gt_boxes: int = 100            # ground-truth boxes per sample (targets, inside tests)
    # flow between slots
    sparse: object = None          # Sparse
    bev: object = None             # Dense
    bev_stride: int = 1
    losses: list = field(default_factory=list)
    # counts a real step produced (--measure), each over the batch: 'dsvt_voxels' [per
    # stage], 'dsvt_sets' [[shift 0, shift 1] per stage], 'bev_columns', 'focal_new_voxels'
    observed: dict = field(default_factory=dict)
    # the report
    shapes: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    unbounded: list = field(default_factory=list)     # (config key, why) of counts without bound
    # data-dependent counts computed on the frames, kept across the replays of one config
    # (estimator.Prepared.cache): key -> value
    cache: dict = field(default_factory=dict)
    flattened_bev_channels: object = None
    map_to_bev_input: object = None    # (C, D, H, W) reaching MAP_TO_BEV
    # OpenPCDet's two-stage models (pcdet_rules): the 3D backbone's multi-scale sparse levels
    # {name: Sparse} the ROI heads pool from, and (points, channels) of a point backbone
    pcdet_levels: object = None
    pcdet_points: object = None

    def shape_line(self, text):
        if text not in self.shapes:
            self.shapes.append(text)

    def note(self, text):
        if text not in self.notes:
            self.notes.append(text)

    def no_bound(self, key, why):
        """A count the config leaves unbounded: the verdict can never be FITS."""
        if (key, why) not in self.unbounded:
            self.unbounded.append((key, why))

    def cached(self, key, compute):
        """``compute()`` once per config and key (frames do not change between replays)."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    @staticmethod
    def counts_key(x):
        """Cache key of what the counts of the Sparse ``x`` depend on: its frames (by identity;
        the cached values keep derived frames alive), or without frames its size and grid."""
        if x.frames:
            return 'frames', id(x.frames)
        return 'uniform', int(x.n), tuple(int(s) for s in x.spatial)

    def dense(self, t, c, h, w):
        """A (B, C, H, W) record of this batch."""
        return Dense(t, self.batch_size, c, h, w)

    def hot_pairs(self, x, k):
        """Pairs of the busiest non-centre offset of a k^3 submanifold conv on the Sparse ``x``
        over the batch (the size of spconv's CPU gather / scatter buffers)."""
        if self.target != 'cpu':
            return 0
        d, h, w = x.spatial
        per_sample = max(1, x.n // self.batch_size)

        def busiest(frame):
            keys = np.sort((frame[:, 0] * h + frame[:, 1]) * w + frame[:, 2])
            r = k // 2
            best = 0
            for dz in range(-r, r + 1):
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        if dz == dy == dx == 0:
                            continue
                        z, y, xx = frame[:, 0] + dz, frame[:, 1] + dy, frame[:, 2] + dx
                        ok = (z >= 0) & (z < d) & (y >= 0) & (y < h) & (xx >= 0) & (xx < w)
                        shifted = (z[ok] * h + y[ok]) * w + xx[ok]
                        pos = np.searchsorted(keys, shifted).clip(max=len(keys) - 1)
                        best = max(best, int((keys[pos] == shifted).sum()))
            return best

        top, _ = self.cached(('hot', self.counts_key(x), self.batch_size, k), lambda: self.worst(
            x.frames, busiest,
            lambda: min(per_sample, -(-per_sample * per_sample // (d * h * w)))))
        return top * self.batch_size

    def worst(self, frames, per_frame, fallback):
        """``per_frame(frame) -> count`` over the counted frames: (largest, median); without
        frames ``fallback()`` gives the assumed count for both."""
        if not frames:
            value = fallback()
            return value, value
        values = sorted(per_frame(f) for f in frames)
        return values[-1], values[len(values) // 2]
