"""SegGPT's training objective and in-context batches with random colour coding."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import processing as P
from .episodes import Episode

SMOOTH_L1_BETA = 0.01


def patch_mask_to_pixels(bool_masked_pos: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """(N, gh*gw) patch mask -> (N, 1, gh*patch, gw*patch) pixel mask."""
    m = bool_masked_pos.reshape(-1, 1, *grid).float()
    return F.interpolate(m, scale_factor=patch, mode="nearest")


def seggpt_loss(pred: torch.Tensor, tgts: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (beta 0.01) over masked pixels and channels, normalised by the mask sum (official).

    ``pixel_mask`` may carry weights instead of 0/1 (see ``foreground_weights``).
    """
    loss = F.smooth_l1_loss(pred.float(), tgts.float(), reduction="none", beta=SMOOTH_L1_BETA)
    mask = pixel_mask.expand_as(loss)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def foreground_weights(tgts: torch.Tensor, weight: float) -> torch.Tensor:
    """(N, 1, H, W): ``weight`` where the target is not the black background, else 1.

    Generated scenes are mostly background, and under an L1-type loss "paint everything
    black" is a deep plateau; weighting the few foreground pixels gets past it sooner.
    """
    black = torch.tensor([-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))],
                         device=tgts.device).view(1, 3, 1, 1)
    fg = ((tgts - black).abs().amax(dim=1, keepdim=True) > 0.05).float()
    return 1 + (weight - 1) * fg


def random_colours(n: int, rng: np.random.Generator, min_dist: float = 90.0) -> np.ndarray:
    """(n + 1, 3) uint8: black background and n random colours far from it and each other.

    Training colours every episode differently, so the model learns to copy the prompt's
    colour code rather than a fixed meaning of colours ("in-context colouring").
    """
    colours = [np.zeros(3)]
    while len(colours) < n + 1:
        c = rng.integers(0, 256, 3).astype(np.float64)
        if all(np.linalg.norm(c - o) >= min_dist for o in colours):
            colours.append(c)
    return np.stack(colours).astype(np.uint8)


def episode_canvases(episodes: Sequence[Episode], size: int, rng: np.random.Generator,
                     palette_prob: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 2S, S) image and target canvases: prompt above query, masks colour-coded."""
    imgs, tgts = [], []
    for ep in episodes:
        colours = P.palette() if rng.random() < palette_prob else random_colours(ep.num_labels, rng)
        pm = P.resize_mask(colours[ep.prompt_labels], size)
        qm = P.resize_mask(colours[ep.query_labels], size)
        imgs.append(P.stack_canvas(P.normalize(P.resize_image(ep.prompt_image, size)),
                                   P.normalize(P.resize_image(ep.query_image, size))))
        tgts.append(P.stack_canvas(P.normalize(pm), P.normalize(qm)))
    return torch.stack(imgs), torch.stack(tgts)


def training_mask(n: int, grid: tuple[int, int], rng: np.random.Generator, query_prob: float = 0.8) -> torch.Tensor:
    """Mostly the whole query half (the inference setting), sometimes a random 50-75 % of the canvas."""
    gh, gw = grid
    masks = np.zeros((n, gh, gw), bool)
    for i in range(n):
        if rng.random() < query_prob:
            masks[i, gh // 2:] = True
        else:
            flat = masks[i].reshape(-1)
            flat[rng.permutation(gh * gw)[: int(rng.uniform(0.5, 0.75) * gh * gw)]] = True
    return torch.from_numpy(masks.reshape(n, -1))
