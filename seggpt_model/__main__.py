"""``python -m seggpt_model predict --prompt IMG --prompt-mask MASK --query IMG --out DIR``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from . import processing as P
from .predictor import SegGPTPredictor
from .weights import DEFAULT_WEIGHTS, DEMO_NOTICE, WEIGHTS_ENV, load_seggpt

log = logging.getLogger("seggpt_model")


def _open(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).copy()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def predict(args: argparse.Namespace) -> None:
    if len(args.prompt) != len(args.prompt_mask):
        raise ValueError(f"{len(args.prompt)} --prompt but {len(args.prompt_mask)} --prompt-mask")
    prompts = [(_open(i), P.mask_file_to_label_map(_open(m))) for i, m in zip(args.prompt, args.prompt_mask)]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = load_seggpt(args.weights)
    if model.is_demo:
        log.warning(DEMO_NOTICE)
    predictor = SegGPTPredictor(model, device=args.device, dtype=dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for q in args.query:
        rgb = P.to_rgb_array(_open(q))
        result = predictor.predict(rgb, prompts, seg_type=args.seg_type)
        stem = Path(q).stem
        Image.fromarray(P.colorize(result.label_map)).save(out / f"{stem}_mask.png")
        Image.fromarray(P.overlay(rgb, result.label_map)).save(out / f"{stem}_overlay.png")
        counts = {int(k): int(v) for k, v in zip(*np.unique(result.label_map, return_counts=True)) if k}
        print(f"{q}: wrote {out / (stem + '_mask.png')} and {stem}_overlay.png; pixels per label {counts}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seggpt_model")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="segment query images in context of prompt (image, mask) pairs")
    p.add_argument("--prompt", action="append", required=True, help="prompt image (repeat for K prompts)")
    p.add_argument("--prompt-mask", action="append", required=True,
                   help="its mask: label ids, 0/255, or one colour per label")
    p.add_argument("--query", action="append", required=True, help="query image (repeatable)")
    p.add_argument("--out", required=True, help="folder for <query>_mask.png and <query>_overlay.png")
    p.add_argument("--weights", default=None,
                   help=f"checkpoint file/folder, hub id or '{DEFAULT_WEIGHTS}' (default: ${WEIGHTS_ENV}, else "
                        f"'{DEFAULT_WEIGHTS}', the bundled demo model, announced with a warning)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--seg-type", choices=("instance", "semantic"), default="instance")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        predict(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
