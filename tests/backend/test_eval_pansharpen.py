"""The held-out split of bench/eval_pansharpen.py: halves on whole MS pixels, disjoint, sides divisible by the
ratio (Wald's protocol decimates them once more)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.eval_pansharpen import Half, fit_patch, longest_run, split_halves


def _check(train: Half, test: Half, ratio: int, h: int, w: int) -> None:
    for half in (train, test):
        assert 0 <= half.r0 < half.r1 <= h and 0 <= half.c0 < half.c1 <= w
        assert (half.r1 - half.r0) % ratio == 0 and (half.c1 - half.c0) % ratio == 0
        rows, cols = half.pan(ratio)
        assert (rows.start, rows.stop, cols.start, cols.stop) == (
            ratio * half.r0,
            ratio * half.r1,
            ratio * half.c0,
            ratio * half.c1,
        )
    assert train.c1 <= test.c0  # disjoint: the train half lies left of the test half


@pytest.mark.parametrize(("h", "w", "ratio"), [(320, 320, 4), (300, 300, 2), (301, 303, 2), (97, 250, 4), (64, 9, 3)])
def test_halves_on_whole_ms_pixels_disjoint_and_divisible(h: int, w: int, ratio: int) -> None:
    train, test = split_halves(h, w, ratio)
    _check(train, test, ratio, h, w)
    assert train.c0 == 0 and test.c0 == train.c1  # nothing lost between the halves
    assert w - test.c1 < ratio and h - train.r1 < ratio  # at most a sliver short of a ratio is dropped
    assert abs((train.c1 - train.c0) - (test.c1 - test.c0)) <= ratio


@pytest.mark.parametrize(("h", "w", "ratio", "max_size"), [(320, 320, 4, 256), (300, 300, 2, 256), (300, 150, 2, 100)])
def test_centre_windows_of_at_most_max_size_pan_pixels(h: int, w: int, ratio: int, max_size: int) -> None:
    train, test = split_halves(h, w, ratio, max_size)
    _check(train, test, ratio, h, w)
    full = split_halves(h, w, ratio)
    for half, outer in zip((train, test), full, strict=True):
        assert ratio * (half.r1 - half.r0) <= max_size and ratio * (half.c1 - half.c0) <= max_size
        assert outer.c0 <= half.c0 and half.c1 <= outer.c1 and outer.r0 <= half.r0 and half.r1 <= outer.r1


def test_too_small_scenes_fail_clearly() -> None:
    with pytest.raises(ValueError, match="cannot be split"):
        split_halves(100, 7, 4)
    with pytest.raises(ValueError, match="no whole MS pixels"):
        split_halves(320, 320, 4, max_size=8)


def test_patch_fits_the_jobs_validation_split() -> None:
    assert fit_patch(Half(0, 320, 0, 160), 4) == 64
    assert fit_patch(Half(0, 64, 0, 64), 4) == 32
    assert fit_patch(Half(0, 64, 0, 64), 2) == 32


def test_longest_run() -> None:
    assert longest_run(np.array([0, 1, 1, 0, 1, 1, 1], bool)) == (4, 7)
    assert longest_run(np.zeros(3, bool)) == (0, 0)
