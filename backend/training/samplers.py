"""Random training patches with the dihedral augmentation (flips and 90° turns), one family for every task:
labelled single- or multi-date areas (half of the patches holding a pixel of the rare class) and unlabelled
aligned stacks on a grid of positions (PAN + MS at reduced resolution)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from backend.io.rasterize import IGNORE
from backend.training.areas import Part


def dihedral(x: np.ndarray, k: int, flip_h: bool, flip_v: bool = False) -> np.ndarray:
    """`x` (…, H, W) turned k times by 90° and flipped, as a contiguous copy."""
    x = np.rot90(x, k, axes=(-2, -1))
    if flip_h:
        x = x[..., :, ::-1]
    if flip_v:
        x = x[..., ::-1, :]
    return np.ascontiguousarray(x)


class PatchSampler:
    """Base of the samplers: a seeded generator and `sample(batch)` -> stacked arrays."""

    def __init__(self, patch: int, seed: int) -> None:
        self.patch, self.rng = patch, np.random.default_rng(seed)

    def sample(self, batch: int) -> tuple[np.ndarray, ...]:
        raise NotImplementedError


class LabelledPatchSampler(PatchSampler):
    """Patches from the training parts of labelled areas: every image of the area (one or more dates) and
    the label; every other patch holds a pixel of a class (the rare ones: change, objects) at a random place
    in it."""

    def __init__(self, parts: list[Part], patch: int, seed: int = 0) -> None:
        super().__init__(patch, seed)
        self.parts = []
        for area, (rows, cols) in parts:
            label = area.label[rows, cols]
            positive = np.argwhere((label > 0) & (label != IGNORE))
            self.parts.append((area, rows, cols, positive))

    def sample(self, batch: int) -> tuple[np.ndarray, ...]:
        out: list[list[np.ndarray]] = []
        p = self.patch
        for i in range(batch):
            area, rows, cols, positive = self.parts[int(self.rng.integers(len(self.parts)))]
            h, w = rows.stop - rows.start, cols.stop - cols.start
            if i % 2 == 0 and len(positive):
                cy, cx = positive[int(self.rng.integers(len(positive)))]
                r = int(np.clip(cy - self.rng.integers(p), 0, h - p))
                c = int(np.clip(cx - self.rng.integers(p), 0, w - p))
            else:
                r, c = int(self.rng.integers(h - p + 1)), int(self.rng.integers(w - p + 1))
            r, c = r + rows.start, c + cols.start
            k = int(self.rng.integers(4))
            flip_h, flip_v = self.rng.random() < 0.5, self.rng.random() < 0.5
            arrays = [*area.images, *area.targets]
            if not out:
                out = [[] for _ in arrays]
            for j, a in enumerate(arrays):
                out[j].append(dihedral(a[..., r : r + p, c : c + p], k, flip_h, flip_v))
        return tuple(np.stack(x) for x in out)


class GridPatchSampler(PatchSampler):
    """Patches of aligned (C, H, W) arrays at positions on multiples of `unit` (whole MS pixels), with a
    random 90° turn and horizontal flip."""

    def __init__(self, arrays: Sequence[np.ndarray], patch: int, unit: int, seed: int) -> None:
        super().__init__(patch, seed)
        h, w = arrays[0].shape[-2:]
        if h < patch or w < patch:
            raise ValueError(f"The training part ({w} x {h}) is smaller than one {patch} x {patch} patch.")
        self.arrays = arrays
        self.rows = np.arange(0, h - patch + 1, unit)
        self.cols = np.arange(0, w - patch + 1, unit)

    def sample(self, batch: int) -> tuple[np.ndarray, ...]:
        p = self.patch
        out: list[list[np.ndarray]] = [[] for _ in self.arrays]
        for _ in range(batch):
            r, c = self.rng.choice(self.rows), self.rng.choice(self.cols)
            k, flip = int(self.rng.integers(4)), bool(self.rng.integers(2))
            for j, a in enumerate(self.arrays):
                out[j].append(dihedral(a[:, r : r + p, c : c + p], k, flip))
        return tuple(np.stack(x) for x in out)
