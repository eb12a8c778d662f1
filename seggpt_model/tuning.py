"""In-context tuning (SegGPT paper §3.3): the model frozen, a learnable prompt image and mask.

The learned pair replaces (or joins) the example prompts at prediction time, so a handful
of corrected tasks can teach a project's notion of a label without touching the weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from . import processing as P
from . import tiling as T
from .metrics import mean_iou
from .modeling import IMAGENET_MEAN, IMAGENET_STD, SegGPT
from .training import foreground_weights, seggpt_loss


@dataclass
class TunedPrompt:
    """A learned prompt: (3, S, S) image and mask in normalised space, and its label count."""

    image: torch.Tensor
    mask: torch.Tensor
    num_labels: int

    def to_bytes(self) -> bytes:
        """safetensors bytes (never pickle): what the prompt store and prompt packs keep."""
        return save({"image": self.image.detach().float().cpu().contiguous(),
                     "mask": self.mask.detach().float().cpu().contiguous()},
                    metadata={"num_labels": str(self.num_labels)})

    @classmethod
    def from_bytes(cls, data: bytes, image_size: int | None = None) -> "TunedPrompt":
        try:
            tensors = load(data)
            header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 length + JSON header
            meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
            image, mask, num_labels = tensors["image"], tensors["mask"], int(meta["num_labels"])
        except Exception as e:
            raise ValueError(f"not a tuned prompt: {type(e).__name__}: {e}") from None
        shape = (3, image_size, image_size) if image_size else tuple(image.shape)
        if tuple(image.shape) != shape or tuple(mask.shape) != shape or len(shape) != 3 or shape[0] != 3:
            raise ValueError(f"tuned prompt tensors must be {shape}, got image {tuple(image.shape)} "
                             f"and mask {tuple(mask.shape)}")
        if not (torch.isfinite(image).all() and torch.isfinite(mask).all()):
            raise ValueError("tuned prompt holds non-finite values")
        if not 1 <= num_labels <= P.MAX_LABELS:
            raise ValueError(f"tuned prompt label count {num_labels} is outside 1..{P.MAX_LABELS}")
        return cls(image, mask, num_labels)


@dataclass
class TuningConfig:
    steps: int = 100
    lr: float = 0.03  # 0.1 (the SegGPT authors' large rate) over-fits a few examples: benchmarks/quality.py
    batch_size: int = 4
    weight_decay: float = 0.0
    seed: int = 0
    augment: bool = False  # crops change object scale; on the quality benchmark tuning did better without
    bf16: bool = False  # autocast where the device supports it
    seg_type: str = "instance"
    fg_weight: float = 3.0  # loss weight of labelled pixels: small objects otherwise tune towards "all black"


@dataclass
class TuningResult:
    prompt: TunedPrompt
    losses: list[float] = field(default_factory=list)
    completed: bool = True


class PromptTuner:
    """Optimise a prompt image and mask on (image, label map) examples; the model never changes."""

    def __init__(self, model: SegGPT, config: TuningConfig | None = None) -> None:
        self.model = model.eval()
        self.config = config or TuningConfig()
        self.size = model.config.image_size
        self.device = next(model.parameters()).device

    def tune(self, examples: Sequence[tuple[object, object]], init: tuple[object, object],
             on_step: Callable[[int, float], bool | None] | None = None) -> TuningResult:
        """Learn a prompt from ``examples``, starting at the ``init`` (image, label map) prompt.

        ``on_step(step, loss)`` may return False to stop early (the result says so).
        """
        cfg = self.config
        if not examples:
            raise ValueError("tuning needs at least one (image, label map) example")
        gen = torch.Generator().manual_seed(cfg.seed)
        imgs, labels = self._prepare(examples)
        init_img, init_labels = self._prepare([init])
        num_labels = max(int(labels.max()), int(init_labels.max()), 1)
        colours = torch.from_numpy(P.palette()).float() / 255
        prompt_img = _normalize(init_img[0]).to(self.device).requires_grad_(True)
        prompt_mask = _normalize(colours[init_labels[0]].permute(2, 0, 1)).to(self.device).requires_grad_(True)
        opt = torch.optim.AdamW([prompt_img, prompt_mask], lr=cfg.lr, weight_decay=cfg.weight_decay)
        params = [p.requires_grad for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        masked = self.model.default_masked_pos(self.device)
        pixel_mask = torch.zeros(1, 1, 2 * self.size, self.size, device=self.device)
        pixel_mask[..., self.size:, :] = 1
        losses: list[float] = []
        completed = True
        dtype = next(self.model.parameters()).dtype
        try:
            for step in range(cfg.steps):
                idx = torch.randint(len(imgs), (cfg.batch_size,), generator=gen)
                q_img, q_lab = imgs[idx], labels[idx]
                if cfg.augment:
                    q_img, q_lab = _augment(q_img, q_lab, gen)
                q_img = _normalize(q_img).to(self.device)
                q_mask = _normalize(colours[q_lab].permute(0, 3, 1, 2)).to(self.device)
                b = q_img.shape[0]
                canvas = torch.cat([prompt_img.expand(b, -1, -1, -1), q_img], dim=2)
                target = torch.cat([prompt_mask.expand(b, -1, -1, -1), q_mask], dim=2)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    pred = self.model(canvas.to(dtype), target.to(dtype), bool_masked_pos=masked,
                                      seg_type=int(cfg.seg_type == "instance"))
                weights = pixel_mask if cfg.fg_weight == 1 else pixel_mask * foreground_weights(target, cfg.fg_weight)
                loss = seggpt_loss(pred, target, weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if on_step is not None and on_step(step, losses[-1]) is False:
                    completed = False
                    break
        finally:
            for p, flag in zip(self.model.parameters(), params):
                p.requires_grad_(flag)
        prompt = TunedPrompt(prompt_img.detach().cpu(), prompt_mask.detach().cpu(), num_labels)
        return TuningResult(prompt, losses, completed)

    def _prepare(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) float images in [0, 1] and (N, S, S) label maps at the model's size."""
        imgs, labs = [], []
        for i, (image, label_map) in enumerate(pairs):
            rgb, lab = P.to_rgb_array(image), P.to_label_map(label_map)
            if lab.shape != rgb.shape[:2]:
                raise ValueError(f"example {i}: label map {lab.shape} does not match its image {rgb.shape[:2]}")
            imgs.append(torch.from_numpy(P.resize_image(rgb, self.size).copy()).permute(2, 0, 1).float() / 255)
            labs.append(torch.from_numpy(P.resize_mask(lab.astype(np.uint8), self.size).astype(np.int64)))
        return torch.stack(imgs), torch.stack(labs)


def choose_init(predictor, examples: Sequence[tuple[object, object]], num_labels: int,
                candidates: int = 4, judges: int = 8) -> int:
    """Index of the example among the first ``candidates`` whose one-shot prediction of (up to
    ``judges``) other examples scores best: a prompt that already works is a better start.

    ``predictor`` is a ``SegGPTPredictor``; ties keep the earlier example.
    """
    if not examples:
        raise ValueError("choosing a starting prompt needs at least one example")
    if len(examples) == 1:
        return 0
    best, best_score = 0, -1.0
    for i in range(min(candidates, len(examples))):
        others = [ex for j, ex in enumerate(examples) if j != i][:judges]
        outs = predictor.predict_batch([img for img, _ in others], [examples[i]], num_labels=num_labels)
        score = float(np.mean([mean_iou(o.label_map, P.to_label_map(lab), num_labels)
                               for o, (_, lab) in zip(outs, others)]))
        if score > best_score:
            best, best_score = i, score
    return best


def scale_matched_examples(examples: Sequence[tuple[object, object]], tiling: T.TilingConfig, canvas: int,
                           max_crops: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, label map) examples at the working scale serving paints at: what to tune on.

    Serving with ``tiling="auto"`` shows the model crops and tiles of ``tiling.crop_side``
    px, not whole large images, so a prompt tuned on whole images learns objects at the wrong
    size.  An example already at scale (objects in range, or no larger than the crop) stays
    whole; a larger one gives up to ``max_crops`` crops around its labelled regions (with the
    background around them).  Examples that label nothing leave no scale to match: all whole.
    ``canvas`` is the model's ``image_size``; returns HxWx3 uint8 / HxW int64 pairs.
    """
    pairs = [(P.to_rgb_array(img), P.to_label_map(lab)) for img, lab in examples]
    for i, (rgb, lab) in enumerate(pairs):
        if lab.shape != rgb.shape[:2]:
            raise ValueError(f"example {i}: label map {lab.shape} does not match its image {rgb.shape[:2]}")
    size = T.object_size([lab for _, lab in pairs])
    if size is None:
        return pairs
    side = T.crop_side(size, canvas, tiling)
    out = []
    for rgb, lab in pairs:
        longest = max(lab.shape)
        if longest <= side or T.in_range(size, longest, tiling):
            out.append((rgb, lab))
        else:
            out.extend((rgb[y:y + h, x:x + w], lab[y:y + h, x:x + w]) for y, x, h, w in T.crop_boxes(lab, side, max_crops))
    return out


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def _augment(imgs: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop and horizontal flip on image and mask; colour jitter on the image only."""
    n, _, s, _ = imgs.shape
    out_i, out_l = [], []
    for k in range(n):
        r = torch.rand(6, generator=gen).tolist()
        scale, ratio = 0.5 + 0.5 * r[0], float(np.exp(np.log(3 / 4) + r[1] * np.log(16 / 9)))
        h = min(s, max(8, int(round(s * (scale / ratio) ** 0.5))))
        w = min(s, max(8, int(round(s * (scale * ratio) ** 0.5))))
        y, x = int(r[2] * (s - h)), int(r[3] * (s - w))
        img = F.interpolate(imgs[k:k + 1, :, y:y + h, x:x + w], size=(s, s), mode="bilinear", align_corners=False)
        lab = F.interpolate(labels[k:k + 1, None, y:y + h, x:x + w].float(), size=(s, s), mode="nearest")
        if r[4] < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        jitter = 1 + (torch.rand(3, generator=gen) - 0.5) * 0.4  # brightness, contrast, saturation
        img = img * jitter[0]
        mean = img.mean(dim=(1, 2, 3), keepdim=True)
        img = (img - mean) * jitter[1] + mean
        grey = img.mean(dim=1, keepdim=True)
        img = (img - grey) * jitter[2] + grey
        out_i.append(img.clamp(0, 1))
        out_l.append(lab.long()[:, 0])
    return torch.cat(out_i), torch.cat(out_l)

