"""Labeling quality on held-out generated episodes: one-shot, K-shot, tuning, retrieval, false positives.

    python benchmarks/quality.py [--weights demo] [--episodes 200] [--projects 8] [--json quality.json]
    python benchmarks/quality.py --suite highres [--episodes 60] [--json benchmarks/results/quality_highres.json]
    python benchmarks/quality.py --suite scale-sweep [--episodes 100]

``standard`` (default): 128 px scenes with objects 0.2-0.42 of the side, predicted with the default
``tiling="auto"`` (one tile at these sizes).  ``highres``: 512-1024 px scenes crowded with
26-54 px objects, ``tiling="off"`` vs ``"auto"``: mIoU and boundary F-score at full resolution,
tiles and seconds per query.  ``scale-sweep``: whole-image 1-shot mIoU against the objects' size
on the canvas, the measurement behind ``seggpt_model.tiling.DEMO_TILING``.

Seeds: training used seeds below 10**8; evaluation episodes start at 10**9 and projects
(shifted domain: shapes and textures never seen in training) at 2 * 10**9.  Training recipes are
compared on validation seeds instead: ``--ks 1 --projects 0 --first-seed 3000000000``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from seggpt_model import SegGPTPredictor, load_seggpt
from seggpt_model.episodes import EVAL_SEED, HIGHRES_SEED, PROJECT_SEED, make_episode, make_highres_episode, make_project
from seggpt_model.metrics import boundary_f_score, mean_iou
from seggpt_model.retrieval import embed_image, most_similar
from seggpt_model.tiling import instance_sizes
from seggpt_model.tuning import PromptTuner, TuningConfig, choose_init

FP_AREA = 0.01  # an absent-target query counts as a false positive above 1 % predicted foreground
SWEEP_SEED = EVAL_SEED + 1_000_000
SWEEP_FRACTIONS = (0.05, 0.07, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.36, 0.43, 0.5, 0.6, 0.7, 0.85)
SWEEP_SIZE = 128  # the demo's training scenes; the canvas holds them at half size


def k_shot(pred: SegGPTPredictor, n: int, ks: list[int], first_seed: int = EVAL_SEED
           ) -> tuple[dict[str, float], dict[str, float]]:
    """Mean IoU per K, and the 1-shot figure by kind of episode (classes, look-alike distractors)."""
    out, kinds = {}, {}
    for k in ks:
        scores = []
        for i in range(n):
            ep = make_episode(first_seed + i, absent_prob=0.0, num_prompts=k)
            res = pred.predict(ep.query_image, ep.prompts, num_labels=ep.num_labels)
            scores.append(mean_iou(res.label_map, ep.query_labels, ep.num_labels))
            if k == 1:
                kind = f"{ep.num_labels} class{'es' if ep.num_labels > 1 else ''}, " + \
                    ("distractors" if ep.distractors else "no distractors")
                kinds.setdefault(kind, []).append(scores[-1])
        out[f"{k}-shot"] = float(np.mean(scores))
    return out, {f"{kind} (n={len(v)})": float(np.mean(v)) for kind, v in sorted(kinds.items())}


def false_positives(pred: SegGPTPredictor, n: int, first_seed: int = EVAL_SEED) -> float:
    hits = 0
    for i in range(n):
        ep = make_episode(first_seed + 500_000 + i, absent_prob=1.0)
        res = pred.predict(ep.query_image, ep.prompts, num_labels=ep.num_labels)
        hits += (res.label_map > 0).mean() > FP_AREA
    return hits / n


def projects(pred: SegGPTPredictor, n_projects: int, sizes: list[int], steps: int, held_out: int) -> dict:
    """Shifted domain: one-shot, recent-K vs similar-K, and tuned prompts from 5/10/20 examples.

    Tuning runs as the backend's does: from the example that best predicts the others.
    """
    acc: dict[str, list[float]] = {}

    def score(name, results, truth, num_labels):
        acc.setdefault(name, []).append(np.mean([mean_iou(r.label_map, t, num_labels)
                                                 for r, (_, t) in zip(results, truth)]))

    for p in range(n_projects):
        scenes, num_labels = make_project(PROJECT_SEED + p, max(sizes) + held_out)
        bank, test = scenes[: max(sizes)], scenes[max(sizes):]
        queries = [img for img, _ in test]
        score("one-shot", pred.predict_batch(queries, bank[:1], num_labels=num_labels), test, num_labels)
        score("recent-4", pred.predict_batch(queries, bank[-4:], num_labels=num_labels), test, num_labels)
        embs = np.stack([embed_image(img) for img, _ in bank])
        similar = [pred.predict(q, [bank[j] for j in most_similar(embed_image(q), embs, 4)], num_labels=num_labels)
                   for q in queries]
        score("similar-4", similar, test, num_labels)
        for n in sizes:
            tuner = PromptTuner(pred.model, TuningConfig(steps=steps, seed=p))
            start = choose_init(pred, bank[:n], num_labels)  # as the backend starts a tuning run
            tuned = tuner.tune(bank[:n], bank[start]).prompt
            score(f"tuned-{n}", pred.predict_batch(queries, tuned=tuned, num_labels=num_labels), test, num_labels)
            score(f"tuned-{n}+similar-3", [
                pred.predict(q, [bank[j] for j in most_similar(embed_image(q), embs[:n], 3)], tuned=tuned,
                             num_labels=num_labels) for q in queries], test, num_labels)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def scale_sweep(pred: SegGPTPredictor, n: int, fractions=SWEEP_FRACTIONS) -> list[dict]:
    """1-shot mIoU of the whole-image path with objects ``f`` of the scene side (+-15 %).

    The size on the canvas is measured as the predictor measures prompts (median longer box
    side of the prompt's connected regions, over the scene side), so the range found here is
    in the units ``TilingConfig`` uses.
    """
    rows = []
    for f in fractions:
        scores, measured = [], []
        for i in range(n):
            px = f * SWEEP_SIZE
            ep = make_episode(SWEEP_SEED + i, size=SWEEP_SIZE, absent_prob=0.0, object_px=(0.85 * px, 1.15 * px))
            res = pred.predict(ep.query_image, ep.prompts, num_labels=ep.num_labels, tiling="off")
            scores.append(mean_iou(res.label_map, ep.query_labels, ep.num_labels))
            sizes = instance_sizes(ep.prompt_labels)
            if sizes.size:  # the largest objects can hide each other completely
                measured.append(np.median(sizes) / SWEEP_SIZE)
        rows.append({"drawn": f, "on canvas": float(np.mean(measured)), "mIoU": float(np.mean(scores))})
    return rows


def highres(pred: SegGPTPredictor, n: int, first_seed: int = HIGHRES_SEED) -> dict:
    """``tiling`` off vs auto on large crowded scenes: quality at full resolution, tiles and time per query.

    Each with and without edge refinement; "off" and "auto" are the predictor's defaults (refined
    with auto only).
    """
    acc: dict[str, dict[str, list[float]]] = {}
    kinds: dict[str, dict[str, list[float]]] = {}
    modes = {"off": ("off", False), "off, refined": ("off", True), "auto, unrefined": ("auto", False),
             "auto": ("auto", True)}
    for i in range(n):
        ep = make_highres_episode(first_seed + i)
        kind = f"{ep.num_labels} class{'es' if ep.num_labels > 1 else ''}, " + \
            ("distractors" if ep.distractors else "no distractors")
        for mode, (tiling, refine) in modes.items():
            t0 = time.perf_counter()
            res = pred.predict(ep.query_image, ep.prompts, num_labels=ep.num_labels, tiling=tiling, refine=refine)
            seconds = time.perf_counter() - t0
            row = acc.setdefault(mode, {})
            row.setdefault("mIoU", []).append(mean_iou(res.label_map, ep.query_labels, ep.num_labels))
            row.setdefault("boundary F", []).append(boundary_f_score(res.label_map, ep.query_labels, ep.num_labels))
            row.setdefault("tiles/query", []).append(res.tiling.tiles)
            row.setdefault("prompt crops", []).append(res.tiling.prompt_crops)
            row.setdefault("s/query", []).append(seconds)
            kinds.setdefault(kind, {}).setdefault(mode, []).append(row["mIoU"][-1])
    return {"modes": {m: {k: float(np.mean(v)) for k, v in row.items()} for m, row in acc.items()},
            "mIoU by kind": {f"{kind} (n={len(v['off'])})": {m: float(np.mean(x)) for m, x in v.items()}
                             for kind, v in sorted(kinds.items())}}


def prompt_counts(raw: str) -> list[int]:
    """``--ks``: comma-separated positive prompt counts."""
    try:
        ks = [int(k) for k in raw.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {raw!r}")
    return ks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="demo")
    ap.add_argument("--suite", choices=("standard", "highres", "scale-sweep"), default="standard")
    ap.add_argument("--episodes", type=int, default=None,
                    help="episodes per measure (default: 200 standard, 60 highres, 100 per size in scale-sweep)")
    ap.add_argument("--projects", type=int, default=8)
    ap.add_argument("--held-out", type=int, default=20)
    ap.add_argument("--tune-steps", type=int, default=150)
    ap.add_argument("--ks", type=prompt_counts, default=[1, 2, 4, 8], help="prompt counts for the train-domain figures")
    ap.add_argument("--first-seed", type=int, default=None,
                    help="first episode seed (standard: 1000000000, highres: 4000000000); 3000000000 is the "
                         "validation range used to choose recipes")
    ap.add_argument("--refine", choices=("default", "on", "off"), default="default",
                    help="edge refinement for the standard suite (default: the predictor's, on with tiling auto)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    refine = {"default": None, "on": True, "off": False}[args.refine]
    pred = SegGPTPredictor(load_seggpt(args.weights), device="auto", refine=refine)
    if args.suite == "highres":
        report = highres_report(pred, args)
    elif args.suite == "scale-sweep":
        report = {"weights": args.weights, "episodes per size": args.episodes or 100,
                  "rows": scale_sweep(pred, args.episodes or 100)}
        print("\n| drawn size / side | measured on canvas | 1-shot mIoU |\n|---|---|---|")
        for r in report["rows"]:
            print(f"| {r['drawn']:.2f} | {r['on canvas']:.3f} | {r['mIoU']:.3f} |")
    else:
        report = standard_report(pred, args)
    report["wall_s"] = round(time.time() - t0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def highres_report(pred: SegGPTPredictor, args: argparse.Namespace) -> dict:
    first = HIGHRES_SEED if args.first_seed is None else args.first_seed
    n = args.episodes or 60
    report = {"weights": args.weights, "suite": "highres", "episodes": n, "first_seed": first,
              "tiling config": dataclasses.asdict(pred.tiling), **highres(pred, n, first)}
    print("\n| tiling | mIoU | boundary F | tiles/query | prompt crops | s/query |\n|---|---|---|---|---|---|")
    for mode, r in report["modes"].items():
        print(f"| {mode} | {r['mIoU']:.3f} | {r['boundary F']:.3f} | {r['tiles/query']:.1f} | "
              f"{r['prompt crops']:.1f} | {r['s/query']:.2f} |")
    for kind, r in report["mIoU by kind"].items():
        print(f"| {kind} | " + " | ".join(f"{m} {v:.3f}" for m, v in r.items()) + " |")
    return report


def standard_report(pred: SegGPTPredictor, args: argparse.Namespace) -> dict:
    first = EVAL_SEED if args.first_seed is None else args.first_seed
    n = args.episodes or 200
    report = {"weights": args.weights, "episodes": n, "projects": args.projects, "first_seed": first,
              "refine": args.refine}
    report["train-domain mIoU"], report["train-domain 1-shot by kind"] = k_shot(pred, n, args.ks, first)
    report["absent-target false-positive rate"] = false_positives(pred, n, first)
    report["shifted-domain mIoU"] = projects(pred, args.projects, [5, 10, 20], args.tune_steps, args.held_out)
    print("\n| measure | value |\n|---|---|")
    for k, v in report["train-domain mIoU"].items():
        print(f"| train domain, {k} mIoU | {v:.3f} |")
    for k, v in report["train-domain 1-shot by kind"].items():
        print(f"| train domain, 1-shot, {k} | {v:.3f} |")
    print(f"| absent target, false-positive rate | {report['absent-target false-positive rate']:.3f} |")
    for k, v in report["shifted-domain mIoU"].items():
        print(f"| shifted domain, {k} mIoU | {v:.3f} |")
    return report


if __name__ == "__main__":
    main()
