"""Segmentation quality of label maps: what the tuning gate and the quality benchmark compare."""
from __future__ import annotations

import numpy as np


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
