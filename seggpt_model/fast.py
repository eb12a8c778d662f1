"""Inference fast path: the same painting as ``SegGPT.forward`` with less work.

- The query half of the canvas is identical for every prompt of a query (same image, same
  mask tokens), and with the feature ensemble it stays identical after every block.  So its
  qkv projection, attention output projection and MLP are computed once per query, not once
  per prompt; only attention itself (whose keys include each prompt) runs per prompt.
- The decoder runs only on the query rows plus the one prompt patch row that the 3x3
  convolution reads at the boundary.
- Attention builds the relative-position bias a band of query rows at a time.
- Weights are used in whatever dtype the model holds (bf16 on AMX CPUs and GPUs), with no
  per-op autocast copies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer_sam import get_rel_pos

from .modeling import SegGPT, SegGPTBlock

ATTENTION_BAND = 256  # query rows per attention band: ~7 patch rows of ViT-L, an L2-sized bias


class FastPainter:
    """Paint Q queries in context of K shared prompts: ``painter(p_img, p_mask, queries)``."""

    def __init__(self, model: SegGPT, band: int = ATTENTION_BAND) -> None:
        self.model = model.eval()
        self.band = band
        cfg = model.config
        self.gh, self.gw = cfg.grid
        self.half = self.gh // 2  # patch rows per half

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, S/p, S/p, C) patch tokens (the canvas halves share the conv)."""
        proj = self.model.patch_embed.proj
        return F.conv2d(x, proj.weight, proj.bias, stride=proj.stride).permute(0, 2, 3, 1)

    @torch.no_grad()  # not inference_mode: torch.compile can trace no_grad
    def __call__(self, p_img: torch.Tensor, p_mask: torch.Tensor, queries: torch.Tensor,
                 seg_type: int = 1) -> torch.Tensor:
        """(K, 3, S, S) prompts, (Q, 3, S, S) queries, all normalised -> (Q, 3, S, S) query paintings."""
        m = self.model
        dtype = m.pos_embed.dtype
        p_img, p_mask, queries = p_img.to(dtype), p_mask.to(dtype), queries.to(dtype)
        k, q = p_img.shape[0], queries.shape[0]
        pos = m.abs_pos()
        pos_top, pos_bottom = pos[:, : self.half], pos[:, self.half:]
        type_tok = m.type_token_ins if seg_type == 1 else m.type_token_cls
        # prompt halves: (2 streams * Q * K, Np, C); query halves: (2 * Q, Nq, C)
        pi = self._embed(p_img) + m.segment_token_x + pos_top + type_tok
        pm = self._embed(p_mask) + m.segment_token_y + pos_top + type_tok
        qi = self._embed(queries) + m.segment_token_x + pos_bottom + type_tok
        qm = (m.mask_token + m.segment_token_y + pos_bottom + type_tok).expand(q, -1, -1, -1)
        c = pi.shape[-1]
        prompt = torch.cat([pi.repeat(q, 1, 1, 1), pm.repeat(q, 1, 1, 1)]).reshape(2 * q * k, -1, c)
        query = torch.cat([qi, qm]).reshape(2 * q, -1, c)
        taps_q, taps_edge = [], []
        for i, blk in enumerate(m.blocks):
            prompt, query = self._block(blk, prompt, query, k)
            if i == m.config.merge_index:
                n = prompt.shape[0] // 2
                prompt, query = (prompt[:n] + prompt[n:]) * 0.5, (query[:q] + query[q:]) * 0.5
            if i in m.config.out_indices:
                taps_q.append(m.norm(query))
                taps_edge.append(m.norm(prompt[::k, -self.gw:]))  # last prompt row of each query's first prompt
        return self._decode(torch.cat(taps_edge, -1), torch.cat(taps_q, -1))

    def _block(self, blk: SegGPTBlock, prompt: torch.Tensor, query: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        attn = blk.attn
        g, nq, c = query.shape
        np_ = prompt.shape[1]
        heads, hd = attn.num_heads, c // attn.num_heads
        qkv = torch.cat([attn.qkv(blk.norm1(prompt)), attn.qkv(blk.norm1(query)).repeat_interleave(k, 0)], 1)
        out = self._attention(qkv.view(g * k, np_ + nq, 3, heads, hd), attn.rel_pos_h, attn.rel_pos_w)
        out_q = out[:, np_:].view(g, k, nq, c).mean(1)  # the ensemble: proj is linear, so average first
        prompt = prompt + attn.proj(out[:, :np_])
        query = query + attn.proj(out_q)
        prompt = prompt + blk.mlp(blk.norm2(prompt))
        query = query + blk.mlp(blk.norm2(query))
        return prompt, query

    def _attention(self, qkv: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, heads, hd) -> (B, N, heads * hd): attention with decomposed relative positions.

        The (N, N) bias per head is the sum of a row term and a column term; it is built and
        used a band of query rows at a time, so it stays in cache instead of making an
        (B * heads, N, N) round trip through memory (SDPA, exact).
        """
        b, n, _, heads, hd = qkv.shape
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, hd) views
        gh, gw = self.gh, self.gw
        grid_q = q.reshape(b, heads, gh, gw, hd)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, get_rel_pos(gh, gh, rel_pos_h)).reshape(b, heads, n, gh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, get_rel_pos(gw, gw, rel_pos_w)).reshape(b, heads, n, gw)
        out = q.new_empty(b, n, heads, hd)
        band = max(1, self.band // gw) * gw
        for s in range(0, n, band):
            e = min(n, s + band)
            bias = (rel_h[:, :, s:e, :, None] + rel_w[:, :, s:e, None, :]).view(b, heads, e - s, n)
            out[:, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], k, v, attn_mask=bias).transpose(1, 2)
        return out.view(b, n, heads * hd)

    def _decode(self, edge: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Decoder on [last prompt patch row; query rows]; the extra row only feeds the 3x3 conv."""
        m, cfg = self.model, self.model.config
        q = query.shape[0]
        tokens = torch.cat([edge, query], 1).view(q, self.half + 1, self.gw, -1)
        x = m.decoder_embed(tokens)
        p, dd = cfg.patch_size, cfg.decoder_embed_dim
        x = x.view(q, self.half + 1, self.gw, p, p, dd).permute(0, 5, 1, 3, 2, 4)
        x = x.reshape(q, dd, (self.half + 1) * p, self.gw * p)
        return m.decoder_pred(x)[:, :, p:]
