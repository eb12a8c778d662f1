"""Serving memory of ViT-L on CPU: peak RSS of loading a checkpoint and predicting, per dtype.

Each case runs in a fresh process: ``load_seggpt(checkpoint, dtype=...)``, then one query with
K prompts through ``SegGPTPredictor`` (the server's path).  The checkpoints are random ViT-L
weights written in the official (.pth) and Hugging Face (model.safetensors) layouts, fp32 like
the released files.

    python benchmarks/memory.py [--prompts 1,4] [--dtypes bf16,fp32] [--config vit_large] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(checkpoint: str, dtype_name: str, prompts: list[int]) -> dict:
    import numpy as np
    import torch

    from seggpt_model import SegGPTPredictor, load_seggpt

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    base = rss_mb()
    model = load_seggpt(checkpoint, dtype=dtype)
    out = {"start_mb": base, "after_load_mb": rss_mb()}
    pred = SegGPTPredictor(model, dtype=dtype)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (720, 960, 3), dtype=np.uint8)
    labels = (rng.random((720, 960)) < 0.2).astype(np.uint8)
    for k in prompts:
        # one canvas, as before tiling: noise labels are thousands of 1-px "objects", which would
        # make auto tiling paint MAX_TILES tiles and measure the tile batch, not the weights
        pred.predict(image, [(image, labels)] * k, num_labels=1, tiling="off")
        out[f"after_k{k}_mb"] = rss_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default="1,4")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--config", default="vit_large", help="SegGPTConfig factory: vit_large or tiny (smoke test)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, metavar=("CHECKPOINT", "DTYPE"))
    args = ap.parse_args()
    prompts = [int(k) for k in args.prompts.split(",")]
    if args.child:
        print(json.dumps(child(*args.child, prompts)))
        return
    from seggpt_model import SegGPTConfig, save_checkpoint
    from seggpt_model.testing import random_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = random_model(getattr(SegGPTConfig, args.config)())
        files = {"official .pth": save_checkpoint(model, Path(tmp) / "seggpt_vit_large.pth"),
                 "HF safetensors": save_checkpoint(model, Path(tmp) / "hf", layout="hf")}
        del model
        for dtype in args.dtypes.split(","):
            for layout, path in files.items():
                proc = subprocess.run([sys.executable, __file__, "--child", str(path), dtype, "--prompts", args.prompts],
                                      capture_output=True, text=True, check=True)
                rows.append({"layout": layout, "dtype": dtype, **json.loads(proc.stdout.strip().splitlines()[-1])})
    cols = ["after_load_mb"] + [f"after_k{k}_mb" for k in prompts]
    print(f"{'checkpoint':15} {'dtype':5} " + " ".join(f"{c.replace('_mb', ''):>12}" for c in cols) + "   (peak RSS MB)")
    for r in rows:
        print(f"{r['layout']:15} {r['dtype']:5} " + " ".join(f"{r[c]:12.0f}" for c in cols))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
