"""Train the small demo SegGPT on generated in-context episodes (SegGPT's recipe in spirit).

Random colour coding per episode, query-half and random masking, smooth-L1 (beta 0.01) with
foreground pixels weighted (--fg-weight),
AdamW with warm-up and a cosine schedule.  Deterministic by seed: episode i of step s is
``make_episode(seed * 10**7 + s * batch + i)``; evaluation seeds live in another range.

    python scripts/train_demo.py --steps 1500 --lr 3e-4 --seed 0 --bf16 --threads 1 --out runs/demo
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from seggpt_model import SegGPT, SegGPTConfig, load_seggpt, save_checkpoint
from seggpt_model.episodes import make_episode
from seggpt_model.training import (episode_canvases, foreground_weights, patch_mask_to_pixels, seggpt_loss,
                                   training_mask)

DEMO_CONFIG = SegGPTConfig(img_size=(128, 64), patch_size=8, embed_dim=192, depth=12, num_heads=6,
                           decoder_embed_dim=32, pretrain_grid=8, drop_path_rate=0.05)
EPISODE_SIZE = 128


class Episodes(torch.utils.data.IterableDataset):
    def __init__(self, seed: int, batch: int, start_step: int, size: int, query_mask_prob: float,
                 absent_prob: float) -> None:
        self.seed, self.batch, self.start, self.size = seed, batch, start_step, size
        self.query_mask_prob, self.absent_prob = query_mask_prob, absent_prob

    def __iter__(self):
        step = self.start
        while True:
            base = self.seed * 10 ** 7 + step * self.batch
            eps = [make_episode(base + i, size=EPISODE_SIZE, absent_prob=self.absent_prob) for i in range(self.batch)]
            rng = np.random.default_rng(base)
            imgs, tgts = episode_canvases(eps, self.size, rng)
            yield imgs, tgts, training_mask(len(eps), DEMO_CONFIG.grid, rng, self.query_mask_prob)
            step += 1


def probability(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a value in [0, 1), got {raw}")
    return value


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 avoids OpenMP stalls on a machine busy with other work)")
    ap.add_argument("--stop-at", type=int, default=None, help="end early at this step, schedule unchanged")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (AMX on CPU, tensor cores on GPU)")
    ap.add_argument("--fg-weight", type=float, default=5.0, help="loss weight of foreground target pixels")
    ap.add_argument("--fg-weight-end", type=float, default=None,
                    help="anneal the foreground weight linearly to this by the last step (default: constant)")
    ap.add_argument("--absent-prob", type=float, default=0.1, help="share of episodes without the target in the query")
    ap.add_argument("--init", default=None, help="start from this checkpoint (a second stage; new cosine cycle)")
    ap.add_argument("--query-mask-prob", type=float, default=0.6,
                    help="share of samples with the whole query half masked; the rest get random masks")
    ap.add_argument("--drop-path", type=probability, default=DEMO_CONFIG.drop_path_rate,
                    help="stochastic depth; generated episodes never repeat, so it may only slow learning")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = SegGPT(dataclasses.replace(DEMO_CONFIG, drop_path_rate=args.drop_path))
    if args.init:
        try:
            model.load_state_dict(load_seggpt(args.init).state_dict())  # strict: must be the demo shape
        except RuntimeError as e:
            problem = next(line.strip() for line in str(e).splitlines() if "size mismatch" in line or "key" in line)
            raise SystemExit(f"--init {args.init} does not fit the demo configuration: {problem}") from None
    model = model.to(args.device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "token" not in n and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "token" not in n and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.999))
    loader = torch.utils.data.DataLoader(Episodes(args.seed, args.batch, 0, DEMO_CONFIG.image_size, args.query_mask_prob,
                                                  args.absent_prob),
                                         batch_size=None, num_workers=1, prefetch_factor=4)
    log = open(out / "loss.jsonl", "w")
    t0 = time.time()
    warmup = max(1, args.steps // 20)
    for step, (imgs, tgts, masked) in enumerate(loader):
        if step >= (args.stop_at or args.steps):
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup)
        imgs, tgts, masked = imgs.to(args.device), tgts.to(args.device), masked.to(args.device)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
            pred = model(imgs, tgts, bool_masked_pos=masked)
        weights = patch_mask_to_pixels(masked, DEMO_CONFIG.grid, DEMO_CONFIG.patch_size)
        fg_weight = args.fg_weight if args.fg_weight_end is None else (
            args.fg_weight + (args.fg_weight_end - args.fg_weight) * step / max(1, args.steps - 1))
        if fg_weight != 1:
            weights = weights * foreground_weights(tgts, fg_weight)
        loss = seggpt_loss(pred, tgts, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        rec = {"step": step, "loss": round(loss.item(), 5), "lr": opt.param_groups[0]["lr"],
               "elapsed_s": round(time.time() - t0, 1)}
        log.write(json.dumps(rec) + "\n")
        if step % 20 == 0:
            log.flush()
            print(rec, flush=True)
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == (args.stop_at or args.steps):
            save_checkpoint(model.eval(), out / "seggpt_demo.safetensors")
            model.train()
    (out / "train_config.json").write_text(json.dumps({**vars(args), "config": model.config.to_dict(),
                                                       "episode_size": EPISODE_SIZE,
                                                       "wall_s": round(time.time() - t0)}, indent=2))


if __name__ == "__main__":
    main()
