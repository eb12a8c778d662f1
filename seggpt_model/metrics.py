"""Segmentation quality of label maps: what the tuning gate and the quality benchmark compare."""
from __future__ import annotations

import math

import cv2
import numpy as np

BOUNDARY_TOLERANCE = 0.008  # DAVIS 2016/2017's boundary measure: tolerance = 0.8 % of the image diagonal


def mean_iou(pred: np.ndarray, truth: np.ndarray, num_labels: int) -> float:
    """Mean IoU over labels 1..num_labels that occur in either map; 1.0 when both are empty.

    Background is not a label: an image whose target is absent scores 1 only if nothing
    was predicted, so false positives cost as much as misses.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in size")
    ious = []
    for label in range(1, num_labels + 1):
        p, t = pred == label, truth == label
        union = np.logical_or(p, t).sum()
        if union:
            ious.append(np.logical_and(p, t).sum() / union)
    return float(np.mean(ious)) if ious else 1.0


def boundary_f_score(pred: np.ndarray, truth: np.ndarray, num_labels: int, tolerance: int | None = None) -> float:
    """Mean over labels 1..num_labels (in either map) of the F-score of boundary pixels; 1.0 when both are empty.

    A predicted boundary pixel counts as correct within ``tolerance`` px of a true one (and
    vice versa for recall); the default is DAVIS's 0.8 % of the image diagonal.  Region IoU
    hardly notices a jagged or shifted edge; this does.  The image border is not a boundary.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in size")
    tol = tolerance if tolerance is not None else max(1, math.ceil(BOUNDARY_TOLERANCE * math.hypot(*truth.shape)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tol + 1, 2 * tol + 1))
    scores = []
    for label in range(1, num_labels + 1):
        p, t = _boundary(pred == label), _boundary(truth == label)
        if not p.any() and not t.any():
            continue
        if not p.any() or not t.any():
            scores.append(0.0)
            continue
        precision = (p & (cv2.dilate(t.view(np.uint8), disk) > 0)).sum() / p.sum()
        recall = (t & (cv2.dilate(p.view(np.uint8), disk) > 0)).sum() / t.sum()
        scores.append(0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall)))
    return float(np.mean(scores)) if scores else 1.0


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border does not count)."""
    m = mask.astype(np.uint8)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    return mask & (cv2.erode(m, cross, borderType=cv2.BORDER_REPLICATE) == 0)


def label_agreement(reference, candidate, episodes) -> list[tuple[float, float]]:
    """Per episode, the mean IoU of ``candidate``'s label map against ``reference``'s, and the
    share of pixels the reference labels (agreement on empty maps proves little).

    Both are predictors (``.predict(query, prompts, num_labels=...)``); this is how a faster
    or lower-precision path is shown to give the same labels as the reference one.
    """
    out = []
    for ep in episodes:
        a = reference.predict(ep.query_image, ep.prompts, num_labels=ep.num_labels).label_map
        b = candidate.predict(ep.query_image, ep.prompts, num_labels=ep.num_labels).label_map
        out.append((mean_iou(b, a, ep.num_labels), float((a > 0).mean())))
    return out
