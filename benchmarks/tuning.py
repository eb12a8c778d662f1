"""Seconds per prompt-tuning step (forward + backward through the frozen model + AdamW on the prompt).

Random weights (speed does not depend on the values), synthetic square-on-noise examples,
one warm-up step, then the median of ``--steps`` timed steps per (configuration, dtype).
bf16 is autocast, as ``TUNE_BF16`` uses it; fp32 weights either way.

    python benchmarks/tuning.py [--configs vit-large,small] [--dtypes fp32,bf16] [--steps 3] [--batch 1]
    python benchmarks/tuning.py --configs tiny --steps 1      # a smoke run in seconds
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from seggpt_model import SegGPTConfig
from seggpt_model.predictor import resolve_device
from seggpt_model.testing import random_model
from seggpt_model.tuning import PromptTuner, TuningConfig

CONFIGS = {
    "vit-large": SegGPTConfig.vit_large,
    # the shape of the bundled demo model (scripts/train_demo.py)
    "small": lambda: SegGPTConfig(img_size=(128, 64), patch_size=8, embed_dim=192, depth=12, num_heads=6,
                                  decoder_embed_dim=32, pretrain_grid=8),
    "tiny": SegGPTConfig.tiny,
}


def examples(size: int, n: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        labels = np.zeros((size, size), np.int32)
        a, b = size // 8 + i, size // 2 + i
        image[a:b, a:b] = (220, 40, 40)
        labels[a:b, a:b] = 1
        out.append((image, labels))
    return out


def measure(name: str, dtype: str, steps: int, batch: int, device: torch.device) -> dict:
    model = random_model(CONFIGS[name]()).to(device)
    data = examples(model.config.image_size)
    config = TuningConfig(steps=steps + 1, batch_size=batch, bf16=dtype == "bf16")
    stamps: list[float] = []
    start = time.perf_counter()
    PromptTuner(model, config).tune(data, data[0], lambda step, loss: stamps.append(time.perf_counter()))
    ends = [start, *stamps]
    per_step = [b - a for a, b in zip(ends[1:], ends[2:])]  # the first (warm-up) step is left out
    return {"config": name, "dtype": dtype, "batch": batch, "steps": len(per_step),
            "s_per_step": statistics.median(per_step), "warmup_s": ends[1] - ends[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="vit-large,small", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    names, dtypes = args.configs.split(","), args.dtypes.split(",")
    for name in names:
        if name not in CONFIGS:
            ap.error(f"unknown configuration {name!r}; expected one of {', '.join(CONFIGS)}")
    if set(dtypes) - {"fp32", "bf16"} or args.steps < 1 or args.batch < 1:
        ap.error("dtypes are fp32 and/or bf16; steps and batch are at least 1")
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    rows = [measure(n, d, args.steps, args.batch, device) for n in names for d in dtypes]
    print(f"\n{'config':<10} {'dtype':<5} {'batch':>5} {'steps':>5} {'s/step':>9} {'warm-up s':>10}")
    for r in rows:
        print(f"{r['config']:<10} {r['dtype']:<5} {r['batch']:>5} {r['steps']:>5} {r['s_per_step']:>9.3f} "
              f"{r['warmup_s']:>10.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
