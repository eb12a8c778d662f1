"""Labeling quality on held-out generated episodes: one-shot, K-shot, tuning, retrieval, false positives.

    python benchmarks/quality.py [--weights demo] [--episodes 200] [--projects 8] [--json quality.json]

Seeds: training used seeds below 10**8; evaluation episodes start at 10**9 and projects
(shifted domain: shapes and textures never seen in training) at 2 * 10**9.  Training recipes are
compared on validation seeds instead: ``--ks 1 --projects 0 --first-seed 3000000000``.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from seggpt_model import SegGPTPredictor, load_seggpt
from seggpt_model.episodes import EVAL_SEED, PROJECT_SEED, make_episode, make_project
from seggpt_model.metrics import mean_iou
from seggpt_model.retrieval import embed_image, most_similar
from seggpt_model.tuning import PromptTuner, TuningConfig, choose_init

FP_AREA = 0.01  # an absent-target query counts as a false positive above 1 % predicted foreground


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
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--projects", type=int, default=8)
    ap.add_argument("--held-out", type=int, default=20)
    ap.add_argument("--tune-steps", type=int, default=150)
    ap.add_argument("--ks", type=prompt_counts, default=[1, 2, 4, 8], help="prompt counts for the train-domain figures")
    ap.add_argument("--first-seed", type=int, default=EVAL_SEED,
                    help="first episode seed; 3000000000 is the validation range used to choose recipes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    pred = SegGPTPredictor(load_seggpt(args.weights), device="auto")
    report = {"weights": args.weights, "episodes": args.episodes, "projects": args.projects,
              "first_seed": args.first_seed}
    report["train-domain mIoU"], report["train-domain 1-shot by kind"] = k_shot(
        pred, args.episodes, args.ks, args.first_seed)
    report["absent-target false-positive rate"] = false_positives(pred, args.episodes, args.first_seed)
    report["shifted-domain mIoU"] = projects(pred, args.projects, [5, 10, 20], args.tune_steps, args.held_out)
    report["wall_s"] = round(time.time() - t0)
    print("\n| measure | value |\n|---|---|")
    for k, v in report["train-domain mIoU"].items():
        print(f"| train domain, {k} mIoU | {v:.3f} |")
    for k, v in report["train-domain 1-shot by kind"].items():
        print(f"| train domain, 1-shot, {k} | {v:.3f} |")
    print(f"| absent target, false-positive rate | {report['absent-target false-positive rate']:.3f} |")
    for k, v in report["shifted-domain mIoU"].items():
        print(f"| shifted domain, {k} mIoU | {v:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
