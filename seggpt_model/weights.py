"""Load and save SegGPT weights: official ``.pth``, Hugging Face layout, folders and hub ids.

The configuration is read off the tensor shapes, so any SegGPT of this architecture
(ViT-L or a small one) loads.  Loading is strict and all-or-nothing.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .modeling import SegGPT, SegGPTConfig

DEFAULT_HUB_ID = "BAAI/seggpt-vit-large"
WEIGHTS_ENV = "SEGGPT_WEIGHTS"
_FILE_CANDIDATES = ("model.safetensors", "pytorch_model.bin", "seggpt_vit_large.pth")
DEMO = "demo"
DEMO_WEIGHTS = Path(__file__).parent / "assets" / "demo" / "seggpt_demo.safetensors"
# What "no weights given" means everywhere (this package, its CLI, the Label Studio backend): the
# bundled demo model, so things work offline; callers announce it (see DEMO_NOTICE).
DEFAULT_WEIGHTS = DEMO
DEMO_NOTICE = ("using the small bundled demo model (SEGGPT_WEIGHTS=demo, the default when nothing else is "
               "configured), trained on generated shapes: a demonstration, not SegGPT ViT-L quality; set "
               f"SEGGPT_WEIGHTS or --weights to {DEFAULT_HUB_ID} or a checkpoint file for real work")


class WeightsError(ValueError):
    """A checkpoint could not be found, read or matched to the SegGPT architecture."""


_HF_GLOBAL = {
    "patch_embed.proj.weight": "model.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "model.embeddings.patch_embeddings.projection.bias",
    "mask_token": "model.embeddings.mask_token",
    "segment_token_x": "model.embeddings.segment_token_input",
    "segment_token_y": "model.embeddings.segment_token_prompt",
    "type_token_cls": "model.embeddings.type_token_semantic",
    "type_token_ins": "model.embeddings.type_token_instance",
    "pos_embed": "model.embeddings.position_embeddings",
    "norm.weight": "model.encoder.layernorm.weight",
    "norm.bias": "model.encoder.layernorm.bias",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "decoder_pred.0.weight": "decoder.decoder_pred.conv.weight",
    "decoder_pred.0.bias": "decoder.decoder_pred.conv.bias",
    "decoder_pred.1.weight": "decoder.decoder_pred.layernorm.weight",
    "decoder_pred.1.bias": "decoder.decoder_pred.layernorm.bias",
    "decoder_pred.3.weight": "decoder.decoder_pred.head.weight",
    "decoder_pred.3.bias": "decoder.decoder_pred.head.bias",
}
_HF_BLOCK = {
    "attn.qkv": "attention.qkv", "attn.proj": "attention.proj",
    "attn.rel_pos_h": "attention.rel_pos_h", "attn.rel_pos_w": "attention.rel_pos_w",
    "mlp.fc1": "mlp.lin1", "mlp.fc2": "mlp.lin2",
    "norm1": "layernorm_before", "norm2": "layernorm_after",
}
_HF_TO_OFFICIAL = {v: k for k, v in _HF_GLOBAL.items()}
_HF_BLOCK_RE = re.compile(r"^model\.encoder\.layers\.(\d+)\.(.+?)((?:\.weight|\.bias)?)$")


def official_to_hf_key(key: str) -> str:
    if key in _HF_GLOBAL:
        return _HF_GLOBAL[key]
    m = re.match(r"^blocks\.(\d+)\.(.+?)((?:\.weight|\.bias)?)$", key)
    if m and m.group(2) in _HF_BLOCK:
        return f"model.encoder.layers.{m.group(1)}.{_HF_BLOCK[m.group(2)]}{m.group(3)}"
    raise WeightsError(f"no Hugging Face name for parameter {key!r}")


def hf_to_official_key(key: str) -> str | None:
    if key in _HF_TO_OFFICIAL:
        return _HF_TO_OFFICIAL[key]
    m = _HF_BLOCK_RE.match(key)
    if m:
        inv = {v: k for k, v in _HF_BLOCK.items()}
        if m.group(2) in inv:
            return f"blocks.{m.group(1)}.{inv[m.group(2)]}{m.group(3)}"
    return None


def to_official_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise a state dict (official, HF, ``module.``-prefixed) to official names."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith(("model.embeddings.", "decoder.decoder_")) for k in state):
        return state
    out, unknown = {}, []
    for k, v in state.items():
        name = hf_to_official_key(k)
        if name is None:
            unknown.append(k)
        else:
            out[name] = v
    if unknown:
        raise WeightsError(f"unexpected keys in Hugging Face checkpoint: {_head(unknown)}")
    return out


def infer_config(state: dict[str, torch.Tensor]) -> SegGPTConfig:
    """Read the model's shape off official-layout tensors."""
    required = ("pos_embed", "patch_embed.proj.weight", "blocks.0.attn.rel_pos_h",
                "blocks.0.attn.rel_pos_w", "blocks.0.mlp.fc1.weight", "decoder_pred.0.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise WeightsError(f"not a SegGPT checkpoint: missing {', '.join(missing)}")
    dim = state["pos_embed"].shape[-1]
    n_pos = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise WeightsError(f"pos_embed has {n_pos} positions after the cls slot, not a square grid")
    patch = state["patch_embed.proj.weight"].shape[-1]
    rel_h, rel_w = state["blocks.0.attn.rel_pos_h"], state["blocks.0.attn.rel_pos_w"]
    head_dim = rel_h.shape[1]
    if dim % head_dim:
        raise WeightsError(f"embedding dim {dim} is not a multiple of the rel-pos head dim {head_dim}")
    gh, gw = (rel_h.shape[0] + 1) // 2, (rel_w.shape[0] + 1) // 2
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    try:
        return SegGPTConfig(img_size=(gh * patch, gw * patch), patch_size=patch, embed_dim=dim, depth=depth,
                            num_heads=dim // head_dim,
                            mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                            decoder_embed_dim=state["decoder_pred.0.weight"].shape[0], pretrain_grid=grid)
    except ValueError as e:
        raise WeightsError(f"checkpoint shapes do not form a SegGPT: {e}") from None


def build_from_state(state: dict[str, torch.Tensor], device=None, dtype=None) -> SegGPT:
    """Strictly load official- or HF-layout tensors into a new model; never half-loaded."""
    state = to_official_layout(state)
    config = infer_config(state)
    with torch.device("meta"):
        model = SegGPT(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {_head(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_head(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_head(wrong)}")
    if problems:
        raise WeightsError("checkpoint does not match SegGPT " + "; ".join(problems))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"checkpoint has non-finite values in {_head(bad)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.to(device=device or "cpu", dtype=dtype or torch.float32).eval()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of one checkpoint file (safetensors preferred; torch files with weights_only)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or not a checkpoint at all
        raise WeightsError(f"cannot read checkpoint {path.name}: {type(e).__name__}: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path.name} does not hold a state dict of tensors")
    return state


def resolve_source(source: str | os.PathLike | None) -> Path:
    """A local checkpoint file for ``source``: a file, a folder, a hub id (downloaded, cached) or ``demo``.

    No source (None or "") means ``$SEGGPT_WEIGHTS``, and when that is unset or empty too,
    ``DEFAULT_WEIGHTS``: the bundled demo model.
    """
    source = default_source(source)
    if str(source) == DEMO:
        if not DEMO_WEIGHTS.is_file():
            raise WeightsError(f"the demo checkpoint is missing from this install ({DEMO_WEIGHTS})")
        return DEMO_WEIGHTS
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in _FILE_CANDIDATES:
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pth"))
        if found:
            return found[0]
        raise WeightsError(f"folder {path} holds no checkpoint ({', '.join(_FILE_CANDIDATES)})")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith((".", "/")):
        return _download(str(source))
    raise WeightsError(f"weights not found: {source} is neither a file, a folder, a hub id nor '{DEMO}'")


def default_source(source: str | os.PathLike | None = None) -> str | os.PathLike:
    """``source``, else ``$SEGGPT_WEIGHTS``, else ``DEFAULT_WEIGHTS`` (an empty value counts as unset)."""
    if source is not None and str(source).strip():
        return source
    return (os.environ.get(WEIGHTS_ENV) or "").strip() or DEFAULT_WEIGHTS


def _download(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    last: Exception | None = None
    for name in _FILE_CANDIDATES:
        try:
            return Path(hf_hub_download(repo_id, name))
        except LocalEntryNotFoundError:
            if name != _FILE_CANDIDATES[-1]:
                continue  # offline: another candidate may be cached
            raise WeightsError(
                f"cannot download {repo_id} (no network) and it is not in the local cache; set {WEIGHTS_ENV} "
                f"to a local weights file, or to '{DEMO}' for the bundled small demo model") from None
        except EntryNotFoundError as e:
            last = e
        except RepositoryNotFoundError:
            raise WeightsError(f"hub repository {repo_id} does not exist or is private") from None
        except Exception as e:  # offline, DNS, proxy, not cached
            raise WeightsError(
                f"cannot download {repo_id} ({type(e).__name__}) and it is not in the local cache; set "
                f"{WEIGHTS_ENV} to a local weights file, or to '{DEMO}' for the bundled small demo model") from None
    raise WeightsError(f"hub repository {repo_id} has none of {', '.join(_FILE_CANDIDATES)}") from last


def read_config(source: str | os.PathLike | None = None) -> SegGPTConfig:
    """The model's shape from a checkpoint's tensor shapes, without loading its weights.

    safetensors headers are read alone; torch files are memory-mapped (zip format) or, for
    the legacy format, read whole. Prompt packs carry this to refuse incompatible models.
    """
    path = resolve_source(source)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as fh:
                state = {k: torch.empty(fh.get_slice(k).get_shape(), device="meta") for k in fh.keys()}
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) torch file: cannot be mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read checkpoint {path.name}: {type(e).__name__}: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path.name} does not hold a state dict of tensors")
    return infer_config(to_official_layout(state))


def load_seggpt(source: str | os.PathLike | None = None, device=None, dtype=None) -> SegGPT:
    """Load SegGPT in eval mode from a file, folder, hub id or ``demo`` (default: ``$SEGGPT_WEIGHTS``, else the demo).

    ``model.is_demo`` tells callers to announce the demo model (DEMO_NOTICE).
    """
    source = default_source(source)
    path = resolve_source(source)
    model = build_from_state(read_state_dict(path), device=device, dtype=dtype)
    model.source = str(source)
    model.is_demo = path == DEMO_WEIGHTS
    return model


def save_checkpoint(model: SegGPT, path: str | os.PathLike, layout: str = "official") -> Path:
    """Write ``model`` as an official ``.pth``/``.safetensors`` file or a Hugging Face folder."""
    path = Path(path)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    if layout == "official":
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            save_file(state, str(path))
        else:
            torch.save({"model": state}, path)
        return path
    if layout == "hf":
        path.mkdir(parents=True, exist_ok=True)
        save_file({official_to_hf_key(k): v for k, v in state.items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(hf_config(model.config), indent=2))
        return path / "model.safetensors"
    raise ValueError(f"unknown layout {layout!r}: use 'official' or 'hf'")


def hf_config(cfg: SegGPTConfig) -> dict:
    """The ``SegGptConfig`` fields of transformers for ``cfg``."""
    return {
        "model_type": "seggpt", "architectures": ["SegGptForImageSegmentation"],
        "hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
        "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": list(cfg.img_size),
        "patch_size": cfg.patch_size, "num_channels": 3, "qkv_bias": True,
        "mlp_dim": int(cfg.embed_dim * cfg.mlp_ratio), "drop_path_rate": cfg.drop_path_rate,
        "pretrain_image_size": cfg.pretrain_grid * cfg.patch_size,
        "decoder_hidden_size": cfg.decoder_embed_dim, "use_relative_position_embeddings": True,
        "merge_index": cfg.merge_index, "intermediate_hidden_state_indices": list(cfg.out_indices),
        "beta": 0.01,
    }


def model_fingerprint(model: SegGPT) -> str:
    """Short id of the model's shape and weights: prompt packs and versions carry it."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name in ("pos_embed", "decoder_pred.3.weight", "mask_token"):
        h.update(model.state_dict()[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _head(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
