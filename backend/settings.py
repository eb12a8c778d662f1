"""Backend configuration, read once from environment variables.

Every value is validated here so that a typo in a deployment fails at start-up
with the variable's name, instead of surfacing later as an obscure runtime error.
Every ``seggpt-backend`` command (and every worker job) gets its settings from
:meth:`Settings.from_env`, so the server and the CLI share one set of defaults.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
# SEGGPT_WEIGHTS when unset: the small demo model bundled with seggpt_model, so every command works
# offline out of the box; the backend logs a WARNING whenever it is used. Equal to
# seggpt_model.weights.DEFAULT_WEIGHTS (kept literal here so that settings stay free of torch).
DEFAULT_WEIGHTS = "demo"
_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?$|^\[[0-9a-f:.]+\](:\d{1,5})?$")


@dataclass(frozen=True)
class Settings:
    """Deployment settings; secrets are kept out of ``repr`` so they never reach logs."""

    label_studio_url: str | None = None
    label_studio_api_key: str | None = field(default=None, repr=False)
    seggpt_weights: str = DEFAULT_WEIGHTS  # file, folder, hub id or "demo"; None or "" mean the default
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 where the device computes it natively (AVX-512 bf16, AMX, CUDA)
    model_dir: Path = Path("./model_dir")
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    local_files_document_root: Path | None = None
    allowed_media_hosts: tuple[str, ...] = ()
    redis_url: str | None = None
    num_prompts: int = 4
    min_region_area: int = 64
    max_image_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 64_000_000
    media_timeout: float = 30.0
    media_cache_mb: int = 256
    max_request_bytes: int = 64 * 1024 * 1024  # LS /predict bodies carry every task's annotations and predictions
    polygon_max_points: int = 100
    keep_versions: int = 20  # prompt-state versions kept per project for rollback
    prompt_selection: str = "similar"  # which K bank entries prompt a query: similar | recent
    tuned_prompt: str = "ensemble"  # a tuned prompt alone, or ensembled with selected examples
    tiling: str = "auto"  # auto: query tiles and prompt crops at the prompts' working scale; off: whole images
    max_tiles: int = 64  # tiles per query at most (large images with small objects)
    tune_steps: int = 100
    tune_lr: float = 0.03
    tune_batch: int = 4
    tune_bf16: str = "auto"  # auto: where the device supports it
    tune_min_gain: float = 0.01  # held-out mean IoU a tuned prompt must add to be promoted
    tune_every_n_corrections: int = 0  # 0: tuning only on request
    torch_threads: int | None = None  # None: torch's default (all cores); 1 suits machines shared with other work

    def __post_init__(self) -> None:
        # None/"" mean "not configured": the demo, never "no weights" nor another read of $SEGGPT_WEIGHTS
        if not self.seggpt_weights:
            object.__setattr__(self, "seggpt_weights", DEFAULT_WEIGHTS)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        """Build settings from ``env``; an empty variable counts as unset."""

        def get(name: str) -> str | None:
            value = env.get(name)
            value = value.strip() if value is not None else None
            return value or None

        def parse(name: str, convert: Callable[[str], T], default: T) -> T:
            raw = get(name)
            if raw is None:
                return default
            try:
                return convert(raw)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None

        user, password = get("BASIC_AUTH_USER"), get("BASIC_AUTH_PASS")
        if (user is None) != (password is None):
            raise ValueError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        return cls(
            label_studio_url=parse("LABEL_STUDIO_URL", _http_url, None),
            label_studio_api_key=get("LABEL_STUDIO_API_KEY"),
            seggpt_weights=get("SEGGPT_WEIGHTS") or DEFAULT_WEIGHTS,
            device=parse("DEVICE", _device, "auto"),
            dtype=parse("DTYPE", _choice("auto", "bf16", "fp32"), "auto"),
            model_dir=Path(get("MODEL_DIR") or "./model_dir"),
            basic_auth_user=user,
            basic_auth_pass=password,
            log_level=parse("LOG_LEVEL", _log_level, "INFO"),
            local_files_document_root=parse("LOCAL_FILES_DOCUMENT_ROOT", _document_root, None),
            allowed_media_hosts=parse("ALLOWED_MEDIA_HOSTS", _host_list, ()),
            redis_url=parse("REDIS_URL", _redis_url, None),
            num_prompts=parse("NUM_PROMPTS", _int_at_least(1), 4),
            min_region_area=parse("MIN_REGION_AREA", _int_at_least(0), 64),
            max_image_bytes=parse("MAX_IMAGE_BYTES", _int_at_least(1024), 64 * 1024 * 1024),
            max_image_pixels=parse("MAX_IMAGE_PIXELS", _int_at_least(1), 64_000_000),
            media_timeout=parse("MEDIA_TIMEOUT", _positive_float, 30.0),
            media_cache_mb=parse("MEDIA_CACHE_MB", _int_at_least(0), 256),
            max_request_bytes=parse("MAX_REQUEST_BYTES", _int_at_least(1024), 64 * 1024 * 1024),
            polygon_max_points=parse("POLYGON_MAX_POINTS", _int_at_least(3), 100),
            keep_versions=parse("KEEP_VERSIONS", _int_at_least(1), 20),
            prompt_selection=parse("PROMPT_SELECTION", _choice("similar", "recent"), "similar"),
            tuned_prompt=parse("TUNED_PROMPT", _choice("ensemble", "alone"), "ensemble"),
            tiling=parse("TILING", _choice("auto", "off"), "auto"),
            max_tiles=parse("MAX_TILES", _int_at_least(1), 64),
            tune_steps=parse("TUNE_STEPS", _int_at_least(1), 100),
            tune_lr=parse("TUNE_LR", _positive_float, 0.03),
            tune_batch=parse("TUNE_BATCH", _int_at_least(1), 4),
            tune_bf16=parse("TUNE_BF16", _choice("auto", "true", "false"), "auto"),
            tune_min_gain=parse("TUNE_MIN_GAIN", _gain, 0.01),
            tune_every_n_corrections=parse("TUNE_EVERY_N_CORRECTIONS", _int_at_least(0), 0),
            torch_threads=parse("TORCH_THREADS", _int_at_least(1), None),
        )


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an absolute http(s):// URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("expected a base URL without credentials, query or fragment")
    return raw.rstrip("/")


def _device(raw: str) -> str:
    value = raw.lower()
    if not _DEVICE_RE.match(value):
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {raw!r}")
    return value


def _log_level(raw: str) -> str:
    value = raw.upper()
    if value not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}, got {raw!r}")
    return value


def _document_root(raw: str) -> Path:
    path = Path(raw).expanduser().resolve()
    if path == Path(path.anchor):
        raise ValueError("the file-system root is refused as a document root")
    if not path.is_dir():
        raise ValueError(f"{raw!r} is not a directory")
    return path


def _host_list(raw: str) -> tuple[str, ...]:
    hosts = tuple(h.strip().lower() for h in raw.split(",") if h.strip())
    for host in hosts:
        if not _HOST_RE.match(host):
            raise ValueError(f"{host!r} is not a host name or host:port")
    return hosts


def _redis_url(raw: str) -> str:
    if urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return raw


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return convert


def _choice(*allowed: str) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        value = raw.lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {raw!r}")
        return value

    return convert


def _gain(raw: str) -> float:
    """An IoU difference: finite, within [-1, 1]."""
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None
    if not -1.0 <= value <= 1.0:
        raise ValueError(f"must be an IoU difference within [-1, 1], got {raw!r}")
    return value


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"must be a positive finite number, got {raw!r}")
    return value
