"""Random-weight models for tests and benchmarks, where the real weights cannot be downloaded."""
from __future__ import annotations

import torch

from .modeling import SegGPT, SegGPTConfig


def randomize(model: SegGPT, seed: int = 0, scale: float = 0.2) -> SegGPT:
    """Give every tensor (rel-pos tables and LayerNorms included) non-trivial random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
            if ("norm" in name or "decoder_pred.1" in name) and name.endswith("weight"):
                p.add_(1.0)
    return model.eval()


def random_model(config: SegGPTConfig | None = None, seed: int = 0) -> SegGPT:
    """A SegGPT of ``config`` (default tiny) with random weights scaled to keep activations sane."""
    config = config or SegGPTConfig.tiny()
    scale = 0.2 if config.embed_dim <= 128 else 0.02
    return randomize(SegGPT(config), seed=seed, scale=scale)
