"""Cheap image embeddings for choosing the prompts most similar to a query.

Computed once per prompt-bank entry and in a millisecond for a query: colour distribution,
edge orientation layout and a coarse thumbnail, each L2-normalised, compared by cosine.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from . import processing as P

EMBEDDING_DIM = 64 + 32 + 64


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def embed_image(image) -> np.ndarray:
    """(EMBEDDING_DIM,) float32 unit vector describing ``image`` (PIL or array, any size)."""
    rgb = np.asarray(Image.fromarray(P.to_rgb_array(image)).resize((64, 64), Image.BILINEAR)).astype(np.float32)
    bins = (rgb // 64).astype(np.int64)
    colour = np.bincount((bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]).ravel(), minlength=64)
    grey = rgb.mean(axis=2)
    gy, gx = np.gradient(grey)
    mag, ang = np.hypot(gx, gy), np.mod(np.arctan2(gy, gx), np.pi)
    obin = np.minimum((ang / np.pi * 8).astype(np.int64), 7)
    edges = np.zeros((2, 2, 8), np.float32)
    for i in range(2):
        for j in range(2):
            sl = (slice(32 * i, 32 * i + 32), slice(32 * j, 32 * j + 32))
            edges[i, j] = np.bincount(obin[sl].ravel(), weights=mag[sl].ravel(), minlength=8)
    thumb = np.asarray(Image.fromarray(grey.astype(np.uint8)).resize((8, 8), Image.BILINEAR)).astype(np.float32)
    thumb = thumb.ravel() - thumb.mean()
    vec = np.concatenate([_unit(colour.astype(np.float32)), _unit(edges.ravel()), _unit(thumb)])
    return _unit(vec).astype(np.float32)


def most_similar(query: np.ndarray, bank: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` rows of ``bank`` (N, D) closest to ``query`` (D,), best first."""
    if bank.ndim != 2 or bank.shape[1] != query.shape[0]:
        raise ValueError(f"bank embeddings {bank.shape} do not match the query's {query.shape}")
    scores = bank @ query
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
