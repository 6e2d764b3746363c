"""Change metrics against hand-computed confusion matrices."""

import numpy as np
import pytest

from backend.metrics.change import BinaryConfusion


def test_hand_computed_confusion() -> None:
    pred = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0])
    ref = np.array([1, 1, 0, 1, 0, 0, 0, 0, 1, 0])
    c = BinaryConfusion()
    c.update(pred[:5], ref[:5])
    c.update(pred[5:], ref[5:])  # dataset-level: counts add up across windows
    assert (c.tp, c.fp, c.fn, c.tn) == (3, 1, 1, 5)
    m = c.metrics()
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75) and m["iou"] == pytest.approx(0.6) and m["oa"] == pytest.approx(0.8)
    # kappa: po = 0.8, pe = (4*4 + 6*6) / 100 = 0.52
    assert m["kappa"] == pytest.approx((0.8 - 0.52) / 0.48)


def test_valid_mask_and_empty_cases() -> None:
    c = BinaryConfusion()
    c.update(np.array([1, 0]), np.array([1, 1]), valid=np.array([True, False]))
    assert (c.tp, c.fn) == (1, 0)
    assert BinaryConfusion().metrics()["f1"] == 0.0
