"""Max abs difference between this SegGPT and Hugging Face's, with identical random weights.

    python benchmarks/parity.py [--vit-large] [--labels N]

``--labels N`` also measures how well label maps from the bf16 fast path agree with the fp32
reference path (mean IoU against it) on N held-out quality episodes, for the demo model and
a random-weight ViT-L.
"""
from __future__ import annotations

import argparse

import torch
from transformers import SegGptConfig, SegGptForImageSegmentation

from seggpt_model import SegGPTConfig, SegGPTPredictor, load_seggpt
from seggpt_model.episodes import EVAL_SEED, make_episode
from seggpt_model.metrics import label_agreement
from seggpt_model.testing import random_model
from seggpt_model.weights import hf_config, official_to_hf_key


def hf_twin(model):
    cfg = {k: v for k, v in hf_config(model.config).items() if k not in ("model_type", "architectures")}
    hf = SegGptForImageSegmentation(SegGptConfig(**cfg)).eval()
    hf.load_state_dict({official_to_hf_key(k): v for k, v in model.state_dict().items()}, strict=True)
    return hf


def compare(config: SegGPTConfig, n: int, embedding_type: str) -> tuple[float, float]:
    model = random_model(config)
    hf = hf_twin(model)
    s = config.image_size
    g = torch.Generator().manual_seed(1)
    imgs, tgts = torch.randn(n, 3, *config.img_size, generator=g), torch.randn(n, 3, *config.img_size, generator=g)
    with torch.no_grad():
        ours = model(imgs, tgts, seg_type=int(embedding_type == "instance"))
        ref = hf(pixel_values=imgs[:, :, s:], prompt_pixel_values=imgs[:, :, :s], prompt_masks=tgts[:, :, :s],
                 embedding_type=embedding_type).pred_masks
    return (ours - ref).abs().max().item(), ref.std().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vit-large", action="store_true", help="also the full ViT-L shape (about a minute)")
    ap.add_argument("--labels", type=int, default=0, metavar="N",
                    help="bf16 fast vs fp32 reference label maps on N episodes (ViT-L: about 25 s each)")
    args = ap.parse_args()
    small = SegGPTConfig(img_size=(224, 112), patch_size=16, embed_dim=256, depth=24, num_heads=4,
                         decoder_embed_dim=32, pretrain_grid=7)
    cases = [("tiny", SegGPTConfig.tiny()), ("D256x24", small)]
    if args.vit_large:
        cases.append(("ViT-L", SegGPTConfig.vit_large()))
    print(f"{'config':8} {'pairs':>5} {'seg_type':9} {'max abs diff':>13} {'output std':>10}")
    for name, cfg in cases:
        for n in (1, 3) if name != "ViT-L" else (1,):
            for et in ("instance", "semantic"):
                diff, std = compare(cfg, n, et)
                print(f"{name:8} {n:5} {et:9} {diff:13.2e} {std:10.3f}")
    if args.labels:
        labels(args.labels)


def spread_head(model, episodes) -> None:
    """Scale a random model's last 1x1 conv so its painting spans the colour range.

    Random ViT-L weights paint a nearly flat grey that decodes to empty label maps, where
    agreement proves nothing; spread to unit std (about the palette's spacing) the maps are
    full of labels that depend on every layer, and bf16 rounding is amplified, not hidden.
    """
    pred = SegGPTPredictor(model, fast=False)
    ep = episodes[0]
    p_img, p_mask, _ = pred.prepare_prompts(ep.prompts[:1])
    query = p_img[:1]  # any canvas will do: only the output's spread is measured
    painted = pred.paint(query, p_img, p_mask)
    head = model.decoder_pred[-1]
    with torch.no_grad():
        centre, spread = painted.mean(dim=(0, 2, 3)), painted.std()
        head.weight /= spread
        head.bias.copy_((head.bias - centre) / spread + centre)


def labels(n: int) -> None:
    episodes = [make_episode(EVAL_SEED + i, absent_prob=0.0, num_prompts=1 + i % 3) for i in range(n)]
    print(f"\n{'model':12} {'episodes':>8} {'mean IoU':>9} {'min IoU':>8} {'labelled':>9}   (bf16 fast vs fp32 reference)")
    def vit_large():
        model = random_model(SegGPTConfig.vit_large())
        spread_head(model, episodes)
        return model

    for name, load in (("demo", lambda: load_seggpt("demo")), ("ViT-L random", vit_large)):
        model = load()
        ref = SegGPTPredictor(model, fast=False)
        low = SegGPTPredictor(load(), dtype=torch.bfloat16)
        scores, labelled = zip(*label_agreement(ref, low, episodes))
        print(f"{name:12} {n:8} {sum(scores) / n:9.4f} {min(scores):8.4f} {sum(labelled) / n:8.1%}", flush=True)
        del model, ref, low


if __name__ == "__main__":
    main()
