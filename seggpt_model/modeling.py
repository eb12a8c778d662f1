"""SegGPT (BAAI, arXiv 2304.03284) on timm's SAM-style ViT blocks.

The model paints the mask of the query (bottom half of the canvas) in the colour
code of the prompt mask (top half).  Weight names follow the official
``seggpt_vit_large.pth`` so its state dict loads without remapping.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import LayerNorm2d, PatchEmbed, trunc_normal_
from timm.models.vision_transformer_sam import Block

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SegGPTConfig:
    """Shape of a SegGPT model; everything here can be read off a checkpoint."""

    img_size: tuple[int, int] = (896, 448)  # canvas (H, W): prompt on top, query below
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 64
    pretrain_grid: int = 14  # pos_embed is (1, 1 + grid**2, C): a cls slot + the pre-training grid
    merge_index: int = 2  # image and mask streams are averaged after this block
    drop_path_rate: float = 0.0
    out_indices: tuple[int, ...] = field(default=())  # taps; () = last block of each quarter

    def __post_init__(self) -> None:
        h, w = self.img_size
        if h != 2 * w or w % self.patch_size:
            raise ValueError(f"canvas must be (2*S, S) with S a multiple of the patch size, got {self.img_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.depth % 4:
            raise ValueError(f"depth must be a multiple of 4 (taps at each quarter), got {self.depth}")
        if not self.out_indices:
            q = self.depth // 4
            object.__setattr__(self, "out_indices", tuple(q * (i + 1) - 1 for i in range(4)))
        if min(self.out_indices) < self.merge_index or max(self.out_indices) >= self.depth:
            raise ValueError(f"taps {self.out_indices} must lie in [merge_index={self.merge_index}, depth)")

    @property
    def grid(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def image_size(self) -> int:
        """Side of one (square) half of the canvas: the size images are resized to."""
        return self.img_size[1]

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        d["out_indices"] = list(self.out_indices)
        return d

    @classmethod
    def vit_large(cls) -> "SegGPTConfig":
        """The released BAAI configuration (370.7 M parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> "SegGPTConfig":
        """A few-milliseconds model of the same architecture, for tests."""
        return cls(img_size=(128, 64), patch_size=16, embed_dim=64, depth=12, num_heads=2,
                   decoder_embed_dim=16, pretrain_grid=4)


class SegGPTBlock(Block):
    """timm's SAM block with SegGPT's feature-ensemble hook between attention and residual."""

    def forward(self, x: torch.Tensor, ensemble_groups: int = 0) -> torch.Tensor:
        """``ensemble_groups`` > 0 averages the query half of the attention output over
        that many equal groups of consecutive batch entries' members (see ``_ensemble``)."""
        a = self.attn(self.norm1(x))
        if ensemble_groups:
            a = _ensemble(a, ensemble_groups)
        x = x + self.drop_path1(self.ls1(a))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _ensemble(a: torch.Tensor, members: int) -> torch.Tensor:
    """Average the query-half rows of ``a`` (B, H, W, C) over runs of ``members`` entries.

    The batch is laid out as [group][member]; every member of a group gets the group mean of
    the query half, the prompt half is left alone (official SegGPT semantics).
    """
    b, h, w, c = a.shape
    grouped = a.view(b // members, members, h, w, c)
    top, bottom = grouped[:, :, : h // 2], grouped[:, :, h // 2:]
    bottom = bottom.mean(dim=1, keepdim=True).expand_as(bottom)
    return torch.cat([top, bottom], dim=2).reshape(b, h, w, c)


class SegGPT(nn.Module):
    """SegGPT encoder-decoder.  ``forward`` takes the official canvas layout."""

    def __init__(self, config: SegGPTConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or SegGPTConfig()
        self.source: str | None = None  # where load_seggpt found the weights
        self.is_demo = False  # the bundled demo model: servers say so loudly
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=3,
                                      embed_dim=d, flatten=False, output_fmt="NHWC")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.segment_token_x = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.segment_token_y = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.type_token_cls = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.type_token_ins = nn.Parameter(torch.zeros(1, 1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pretrain_grid ** 2, d))
        norm = partial(nn.LayerNorm, eps=1e-6)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            SegGPTBlock(d, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, drop_path=dpr[i],
                        act_layer=nn.GELU, norm_layer=norm, use_rel_pos=True, window_size=0,
                        input_size=cfg.grid)
            for i in range(cfg.depth)
        )
        self.norm = norm(d)
        p, dd = cfg.patch_size, cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(d * len(cfg.out_indices), p * p * dd)
        self.decoder_pred = nn.Sequential(
            nn.Conv2d(dd, dd, kernel_size=3, padding=1), LayerNorm2d(dd, eps=1e-6), nn.GELU(),
            nn.Conv2d(dd, 3, kernel_size=1),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """Official initialisation (only matters when training from scratch)."""
        for t in (self.mask_token, self.segment_token_x, self.segment_token_y,
                  self.type_token_cls, self.type_token_ins):
            nn.init.normal_(t, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def default_masked_pos(self, device: torch.device | None = None) -> torch.Tensor:
        """(1, num_patches) with the query (bottom) half masked, as at inference."""
        gh, gw = self.config.grid
        m = torch.zeros(1, gh, gw, dtype=torch.bool, device=device)
        m[:, gh // 2:] = True
        return m.flatten(1)

    def abs_pos(self) -> torch.Tensor:
        """Pre-training position table resized (bicubic, no antialias) to the canvas grid."""
        g = self.config.pretrain_grid
        table = self.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table.float(), size=self.config.grid, mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).to(self.pos_embed.dtype)

    def embed(self, imgs: torch.Tensor, tgts: torch.Tensor, bool_masked_pos: torch.Tensor,
              seg_type: torch.Tensor) -> torch.Tensor:
        """Both streams as one (2N, gh, gw, C) batch: [images; masks]."""
        x = self.patch_embed(imgs)
        y = self.patch_embed(tgts)
        gh, gw = self.config.grid
        w = bool_masked_pos.reshape(-1, gh, gw, 1).to(y.dtype)
        y = y * (1 - w) + self.mask_token * w
        pos = self.abs_pos()
        st = seg_type.reshape(-1, 1, 1, 1).to(x.dtype)
        type_emb = self.type_token_cls * (st == 0) + self.type_token_ins * (st == 1)
        x = x + self.segment_token_x + pos + type_emb
        y = y + self.segment_token_y + pos + type_emb
        return torch.cat([x, y], dim=0)

    def forward_encoder(self, x: torch.Tensor, members: int = 0) -> list[torch.Tensor]:
        """Run the blocks; ``members`` > 1 enables the ensemble over that many prompts per query.

        Before the merge the batch holds two streams, so the ensemble runs per stream
        (the same grouping applies because each stream's entries are consecutive).
        """
        cfg = self.config
        taps = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, ensemble_groups=members if members > 1 else 0)
            if i == cfg.merge_index:
                n = x.shape[0] // 2
                x = (x[:n] + x[n:]) * 0.5
            if i in cfg.out_indices:
                taps.append(self.norm(x))
        return taps

    def forward_decoder(self, taps: list[torch.Tensor]) -> torch.Tensor:
        x = self.decoder_embed(torch.cat(taps, dim=-1))
        n, gh, gw, _ = x.shape
        p, dd = self.config.patch_size, self.config.decoder_embed_dim
        x = x.view(n, gh, gw, p, p, dd).permute(0, 5, 1, 3, 2, 4).reshape(n, dd, gh * p, gw * p)
        return self.decoder_pred(x)

    def forward(self, imgs: torch.Tensor, tgts: torch.Tensor, bool_masked_pos: torch.Tensor | None = None,
                seg_type: torch.Tensor | int | None = None, feature_ensemble: bool = False,
                prompts_per_query: int | None = None) -> torch.Tensor:
        """Paint the masked part of ``tgts``.

        imgs, tgts: (N, 3, H, W) ImageNet-normalised canvases.  bool_masked_pos: (N or 1,
        num_patches), default the query half.  seg_type: 0 semantic / 1 instance (default),
        an int or (N,) / (N, 1).  feature_ensemble: average the query half over the prompts
        (the whole batch, or runs of ``prompts_per_query`` entries when several queries
        are batched).  Returns (N, 3, H, W) in normalised space.
        """
        n = self._check_inputs(imgs, tgts)
        if bool_masked_pos is None:
            bool_masked_pos = self.default_masked_pos(imgs.device)
        if bool_masked_pos.shape[-1] != self.config.num_patches or bool_masked_pos.shape[0] not in (1, n):
            raise ValueError(f"bool_masked_pos must be (N or 1, {self.config.num_patches}), "
                             f"got {tuple(bool_masked_pos.shape)}")
        bool_masked_pos = bool_masked_pos.expand(n, -1)
        if seg_type is None:
            seg_type = 1
        seg_type = torch.as_tensor(seg_type, device=imgs.device).reshape(-1).expand(n)
        members = 0
        if feature_ensemble:
            members = prompts_per_query or n
            if n % members:
                raise ValueError(f"batch of {n} is not a whole number of {members}-prompt groups")
        dtype = self.pos_embed.dtype
        x = self.embed(imgs.to(dtype), tgts.to(dtype), bool_masked_pos, seg_type)
        return self.forward_decoder(self.forward_encoder(x, members))

    def _check_inputs(self, imgs: torch.Tensor, tgts: torch.Tensor) -> int:
        h, w = self.config.img_size
        for name, t in (("imgs", imgs), ("tgts", tgts)):
            if t.ndim != 4 or tuple(t.shape[1:]) != (3, h, w):
                raise ValueError(f"{name} must be (N, 3, {h}, {w}), got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or infinite values")
        if imgs.shape[0] != tgts.shape[0]:
            raise ValueError(f"imgs and tgts batch sizes differ: {imgs.shape[0]} vs {tgts.shape[0]}")
        return imgs.shape[0]

