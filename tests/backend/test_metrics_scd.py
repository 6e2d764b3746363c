"""Semantic change metrics (SeK, Fscd, binary mIoU) against hand-computed confusion matrices."""

import math

import numpy as np
import pytest

from backend.metrics.change import SemanticChangeConfusion

# Eight pixels, two land-cover classes. (date-1 class, date-2 class), 0 = unchanged:
#   pixel  reference  prediction
#   0      (0, 0)     (0, 0)     no change, right
#   1      (0, 0)     (1, 2)     false change
#   2      (0, 0)     (0, 0)     no change, right
#   3      (1, 2)     (1, 2)     change, both classes right
#   4      (1, 2)     (2, 2)     change, date-1 class wrong
#   5      (2, 1)     (2, 1)     change, both classes right
#   6      (0, 0)     (1, 1)     false change
#   7      (2, 1)     (0, 0)     missed change
REF1 = np.array([0, 0, 0, 1, 1, 2, 0, 2])
REF2 = np.array([0, 0, 0, 2, 2, 1, 0, 1])
PRED1 = np.array([0, 1, 0, 1, 2, 2, 1, 0])
PRED2 = np.array([0, 2, 0, 2, 2, 1, 1, 0])
# H (rows = reference, columns = prediction), one count per pixel and date:
#   [[4, 3, 1],
#    [1, 2, 1],
#    [1, 0, 3]]      total 16, row sums [8, 4, 4], column sums [6, 5, 5]
H = np.array([[4, 3, 1], [1, 2, 1], [1, 0, 3]])


def test_hand_computed_semantic_change_metrics() -> None:
    c = SemanticChangeConfusion(2)
    c.update(PRED1, PRED2, REF1, REF2)
    assert c.hist.dtype == np.int64
    assert np.array_equal(c.hist, H)
    m = c.metrics()
    # OA = (4 + 2 + 3) / 16
    assert m["oa"] == pytest.approx(9 / 16)
    # kappa: po = 9/16, pe = (8*6 + 4*5 + 4*5) / 256 = 88/256 -> (0.5625 - 0.34375) / 0.65625 = 1/3
    assert m["kappa"] == pytest.approx(1 / 3)
    # 2x2 collapse: no change 4, labelled changed 16-8 = 8, predicted changed 16-6 = 10, both changed 2+1+0+3 = 6
    # IoU_nochange = 4 / (8 + 6 - 4) = 0.4, IoU_change = 6 / (8 + 10 - 6) = 0.5, mIoU = 0.45
    assert m["iou_nochange"] == pytest.approx(0.4) and m["iou_change"] == pytest.approx(0.5)
    assert m["miou"] == pytest.approx(0.45)
    # H with H[0,0] = 0: total 12, po = 5/12, rows [4, 4, 4], cols [2, 5, 5], pe = (8 + 20 + 20) / 144 = 1/3
    # kappa_n0 = (5/12 - 4/12) / (2/3) = 1/8; SeK = 1/8 * e^0.5 / e
    assert m["sek"] == pytest.approx(0.125 * math.exp(0.5) / math.e)
    # semantic TP = 2 + 3 = 5; P_sc = 5/10, R_sc = 5/8; Fscd = 2 * 0.5 * 0.625 / 1.125 = 5/9
    assert m["precision_sc"] == pytest.approx(0.5) and m["recall_sc"] == pytest.approx(0.625)
    assert m["fscd"] == pytest.approx(5 / 9)
    # IoU_1 = 2 / (4 + 5 - 2), IoU_2 = 3 / (4 + 5 - 3)
    assert m["iou_class_1"] == pytest.approx(2 / 7) and m["iou_class_2"] == pytest.approx(0.5)


def test_valid_mask_drops_pixels_from_both_dates() -> None:
    c = SemanticChangeConfusion(2)
    valid = np.ones(8, dtype=bool)
    valid[[1, 6]] = False  # drop both false changes
    c.update(PRED1, PRED2, REF1, REF2, valid)
    # Row 0 loses (0,1) x3 and (0,2) x1, H[0,0] stays 4.
    assert np.array_equal(c.hist, [[4, 0, 0], [1, 2, 1], [1, 0, 3]])
    # P_sc = 5 / (12 - 6) = 5/6, R_sc = 5/8
    assert c.metrics()["precision_sc"] == pytest.approx(5 / 6)


def test_windows_accumulate_like_one_update() -> None:
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 4, size=(4, 3, 40, 50))  # pred1, pred2, ref1, ref2 for three windows
    valid = rng.random((3, 40, 50)) > 0.2
    parts = SemanticChangeConfusion(3)
    for w in range(3):
        parts.update(*maps[:, w], valid=valid[w])
    whole = SemanticChangeConfusion(3)
    whole.update(*maps.reshape(4, 3 * 40, 50), valid=valid.reshape(3 * 40, 50))
    assert np.array_equal(parts.hist, whole.hist)
    assert parts.metrics() == whole.metrics()
    brute = np.zeros((4, 4), dtype=np.int64)
    for p, r in ((maps[0], maps[2]), (maps[1], maps[3])):
        np.add.at(brute, (r[valid], p[valid]), 1)
    assert np.array_equal(whole.hist, brute)


def test_perfect_prediction() -> None:
    ref1, ref2 = np.array([[0, 1], [2, 0]]), np.array([[0, 2], [1, 0]])
    c = SemanticChangeConfusion(2)
    c.update(ref1, ref2, ref1, ref2)
    m = c.metrics()
    # kappa_n0 = 1 and IoU_change = 1, so SeK = 1 * e^1 / e = 1
    for key in ("miou", "sek", "fscd", "oa", "kappa", "iou_class_1", "iou_class_2"):
        assert m[key] == pytest.approx(1.0), key


def test_perfect_prediction_of_a_single_changed_class_has_zero_sek() -> None:
    # H_n0 = [[0, 0], [0, 2]]: pe = 1, kappa undefined -> 0 (SECOND's convention), so SeK = 0.
    ref = np.array([0, 1])
    c = SemanticChangeConfusion(1)
    c.update(ref, ref, ref, ref)
    m = c.metrics()
    assert m["sek"] == 0.0 and m["fscd"] == pytest.approx(1.0) and m["miou"] == pytest.approx(1.0)


def test_no_change_anywhere() -> None:
    zeros = np.zeros(6, dtype=np.uint8)
    c = SemanticChangeConfusion(2)
    c.update(zeros, zeros, zeros, zeros)
    m = c.metrics()
    # H = [[12, 0, 0], ...]: only "no change" is present, so the binary mIoU is its IoU = 1.
    # Nothing changed or was predicted changed: kappa_n0 (empty matrix), IoU_change, P_sc and R_sc are 0.
    assert m["oa"] == 1.0 and m["miou"] == 1.0
    assert m["sek"] == 0.0 and m["fscd"] == 0.0 and m["iou_change"] == 0.0


def test_false_changes_where_nothing_changed() -> None:
    ref = np.zeros(4, dtype=np.uint8)
    pred = np.array([0, 0, 0, 1])
    c = SemanticChangeConfusion(1)
    c.update(pred, pred, ref, ref)
    m = c.metrics()
    # H = [[6, 2], [0, 0]]: IoU_nochange = 6 / (8 + 6 - 6) = 0.75, IoU_change = 0 / 2 = 0 -> mIoU 0.375
    assert m["miou"] == pytest.approx(0.375) and m["fscd"] == 0.0
    # H_n0 = [[0, 2], [0, 0]]: po = 0, pe = (2*0 + 0*2) / 4 = 0 -> kappa_n0 = 0
    assert m["sek"] == 0.0


def test_empty_and_bad_input() -> None:
    assert SemanticChangeConfusion(2).metrics()["fscd"] == 0.0
    c = SemanticChangeConfusion(2)
    with pytest.raises(ValueError, match="holds class 3"):
        c.update(np.array([3]), np.array([0]), np.array([0]), np.array([0]))
    with pytest.raises(ValueError, match="reference holds class -1"):
        c.update(np.array([0]), np.array([0]), np.array([0]), np.array([-1]))  # date 1 fine, date 2 not
    with pytest.raises(ValueError, match="same size"):
        c.update(np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(2))
    assert c.hist.sum() == 0
    with pytest.raises(ValueError, match="at least one"):
        SemanticChangeConfusion(0)
