"""Generate the quickstart's demo project: 8 images of two object classes and their label maps.

    python scripts/make_demo_project.py                    # write backend/quickstart/demo/ and measure
    python scripts/make_demo_project.py --check            # measure only (the bundled files are not touched)
    python scripts/make_demo_project.py --search 40        # try 40 scene seeds per class pair, print the best

Scenes come from seggpt_model.episodes' drawing code (shapes, textures, the muted background), with
two fixed classes from the training domain, no look-alike distractors and large objects that do not
overlap, so that the bundled demo model (64-px canvas halves) can see them: each scene holds one or
two instances of each class. The first two images are the project's annotated examples; the
measure is the mean IoU of the demo model's 2-prompt prediction (as the backend prompts it: both
examples, instance colours, bf16 where native) on the other six, against the generated label maps.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seggpt_model.episodes import COLOURS, ObjectClass, _background, _shape_mask, _texture  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "backend" / "quickstart" / "demo"
SIZE = 256
COUNT = 8
ANNOTATED = 2
JPEG_QUALITY = 92
# (name, class) pairs tried by --search; the first is the bundled one (chosen by --search, see README)
CANDIDATES = [
    (("Coin", ObjectClass("circle", "solid", (3, 9))), ("Tile", ObjectClass("square", "checker", (2, 7)))),
    (("Sun", ObjectClass("circle", "solid", (3, 6))), ("Leaf", ObjectClass("diamond", "stripes", (1, 7)))),
    (("Ring", ObjectClass("ring", "solid", (0, 8))), ("Kite", ObjectClass("triangle", "dots", (2, 7)))),
    (("Cross", ObjectClass("cross", "solid", (0, 7))), ("Gem", ObjectClass("diamond", "solid", (5, 4)))),
]
SEED = 9  # the best of seeds 0-9 for the first pair (--search 10: mean 0.845, this one 0.865)


def scene(rng: np.random.Generator, classes: list[ObjectClass]) -> tuple[np.ndarray, np.ndarray]:
    """One image with 1-2 non-overlapping instances per class (label i + 1 for classes[i])."""
    img = _background(SIZE, rng)
    labels = np.zeros((SIZE, SIZE), np.uint8)
    boxes: list[tuple[int, int, int]] = []
    for label, cls in enumerate(classes, start=1):
        for _ in range(int(rng.integers(1, 3))):
            for _attempt in range(100):
                s = int(rng.uniform(0.3, 0.42) * SIZE)
                y, x = (int(v) for v in rng.integers(0, SIZE - s, 2))
                if all(x + s <= bx or bx + bs <= x or y + s <= by or by + bs <= y for bx, by, bs in boxes):
                    break
            else:
                continue  # no room left: fewer instances
            boxes.append((x, y, s))
            mask = _shape_mask(cls.shape, s, rng.uniform(0, 2 * math.pi))
            tex = _texture(cls.texture, s, COLOURS[cls.colours[0]].astype(np.float32),
                           COLOURS[cls.colours[1]].astype(np.float32), rng)
            img[y:y + s, x:x + s][mask] = tex[mask]
            labels[y:y + s, x:x + s][mask] = label
    return np.clip(img, 0, 255).astype(np.uint8), labels


def project(seed: int, classes: list[ObjectClass]) -> list[tuple[bytes, np.ndarray]]:
    """The scenes as the bundled files hold them: JPEG bytes and label maps."""
    rng = np.random.default_rng(seed)
    return [(jpeg(img), labels) for img, labels in (scene(rng, classes) for _ in range(COUNT))]


def jpeg(img: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def measure(predictor, scenes: list[tuple[bytes, np.ndarray]]) -> list[float]:
    """Per query, the mean IoU of the 2-prompt prediction (the annotated images as prompts)."""
    from seggpt_model.metrics import mean_iou

    def decode(data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data)).convert("RGB")

    prompts = [(decode(data), labels) for data, labels in scenes[:ANNOTATED]]
    out = []
    for data, labels in scenes[ANNOTATED:]:
        pred = predictor.predict(decode(data), prompts, num_labels=2, seg_type="instance")
        out.append(mean_iou(pred.label_map, labels, 2))
    return out


def load_predictor():
    import torch

    from seggpt_model import SegGPTPredictor, load_seggpt

    torch.set_num_threads(1)
    return SegGPTPredictor(load_seggpt("demo"), device="cpu", dtype="auto")


def write(scenes: list[tuple[bytes, np.ndarray]], names: tuple[str, str], ious: list[float]) -> None:
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    (OUT / "labels").mkdir(parents=True, exist_ok=True)
    files = []
    for old in (*(OUT / "images").iterdir(), *(OUT / "labels").iterdir()):
        old.unlink()
    for i, (data, labels) in enumerate(scenes, start=1):
        name = f"demo_{i:02d}"
        (OUT / "images" / f"{name}.jpg").write_bytes(data)
        Image.fromarray(labels).save(OUT / "labels" / f"{name}.png", optimize=True)
        files.append(f"{name}.jpg")
    manifest = {
        "labels": list(names),
        "images": files,
        "annotated": files[:ANNOTATED],
        "size": SIZE,
        "label_maps": "labels/<image stem>.png: 0 background, 1 = labels[0], 2 = labels[1]",
        "made_by": f"scripts/make_demo_project.py (seed {SEED})",
        "demo_model_2_prompt_miou": {"mean": round(float(np.mean(ious)), 3),
                                     "per_image": dict(zip(files[ANNOTATED:], (round(v, 3) for v in ious)))},
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="measure only, write nothing")
    parser.add_argument("--search", type=int, default=0, metavar="N", help="try N seeds per candidate class pair")
    args = parser.parse_args()
    predictor = load_predictor()
    if args.search:
        for pair in CANDIDATES:
            names, classes = [n for n, _ in pair], [c for _, c in pair]
            scores = [(float(np.mean(measure(predictor, project(s, classes)))), s) for s in range(args.search)]
            mean = float(np.mean([v for v, _ in scores]))
            best = max(scores)
            print(f"{names}: mean over seeds {mean:.3f}, best seed {best[1]} at {best[0]:.3f}")
        return
    names, classes = [n for n, _ in CANDIDATES[0]], [c for _, c in CANDIDATES[0]]
    scenes = project(SEED, classes)
    ious = measure(predictor, scenes)
    print(f"demo model, 2-prompt mIoU on the other {len(ious)}: {np.mean(ious):.3f} "
          f"(per image {', '.join(f'{v:.3f}' for v in ious)})")
    if not args.check:
        write(scenes, (names[0], names[1]), ious)
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
