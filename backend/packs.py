"""Prompt packs: a project's prompt state as one zip file, to copy it between projects,
deployments and teams.

``manifest.json`` holds the pack format, the model it was made with (fingerprint and
shape config), when, from which project and version, the prediction settings, the tuned
prompt's metadata and, per entry, its metadata and the members holding its images and
label maps (``entries/<task>/...``); ``tuned.safetensors`` holds the tuned prompt, if any.
An import is checked whole (archive, bounds, every image and label map, the tuned tensors,
the model's shape) before anything is written, then becomes one new version.
"""
from __future__ import annotations

import io
import json
import math
import time
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from backend.store import PromptEntry, PromptStore, check_tuned_prompt, model_version, validate_settings
from seggpt_model.processing import MAX_LABELS

PACK_FORMAT = 1
MAX_MEMBERS = 10_000
MAX_UNPACKED_BYTES = 512 << 20  # zip bombs: total uncompressed size allowed
MAX_IMAGE_SIDE = 4096  # stored prompts are at most bank.WORKING_SIZE px; larger is not a pack of ours
MANIFEST = "manifest.json"
TUNED = "tuned.safetensors"


@dataclass(frozen=True)
class ModelIdentity:
    """The model a pack is made for: weights fingerprint and shape (SegGPTConfig.to_dict())."""

    fingerprint: str
    config: dict

    @property
    def image_size(self) -> int:
        return int(self.config["img_size"][1])


@dataclass
class Pack:
    """A checked pack, ready to become a project's state."""

    manifest: dict
    entries: list[PromptEntry]
    tuned: tuple[bytes, dict] | None
    settings: dict
    warnings: list[str] = field(default_factory=list)


def export_pack(store: PromptStore, project: str, model: ModelIdentity) -> tuple[bytes, int]:
    """The project's current prompt state as pack bytes, and the version it holds."""
    state, entries = store.entries(project)
    tuned = store.tuned_prompt(project, state)
    records = []
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for entry in entries:
            folder = f"entries/{entry.task_id}"
            images = {}
            for i, (key, data) in enumerate(sorted(entry.images.items())):
                images[key] = f"{folder}/image-{i}.{_extension(data)}"
                zf.writestr(images[key], data, zipfile.ZIP_STORED)  # JPEG/PNG: compressed already
            maps = {}
            for i, (control, data) in enumerate(sorted(entry.label_maps.items())):
                maps[control] = f"{folder}/map-{i}.png"
                zf.writestr(maps[control], data, zipfile.ZIP_STORED)
            records.append({"task_id": entry.task_id, "annotation_id": entry.annotation_id,
                            "updated_at": entry.updated_at, "meta": entry.meta, "images": images, "label_maps": maps})
        if tuned is not None:
            zf.writestr(TUNED, tuned)
        manifest = {"format": PACK_FORMAT, "model": {"fingerprint": model.fingerprint, "config": model.config},
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source_project": project,
                    "version": state.version, "model_version": model_version(model.fingerprint, state.version),
                    "settings": dict(state.settings),
                    "tuned": {"file": TUNED, "meta": state.tuned["meta"]} if tuned is not None else None,
                    "entries": records}
        zf.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return buf.getvalue(), state.version


def import_pack(store: PromptStore, project: str, data: bytes, model: ModelIdentity) -> dict:
    """Make the pack ``data`` the project's prompt state, as one new version.

    Raises ValueError naming the problem, before anything is written, for a pack that is
    damaged, too large, or made for a model of another shape.
    """
    pack = read_pack(data, model)
    source = f"project {pack.manifest.get('source_project', '?')} v{pack.manifest.get('version', '?')}"
    version = store.replace_state(project, pack.entries, pack.tuned, pack.settings,
                                  change=f"pack import ({source}, {len(pack.entries)} entries)")
    return {"version": version, "model_version": model_version(model.fingerprint, version),
            "entries": len(pack.entries), "tuned": pack.tuned is not None, "warnings": pack.warnings}


def read_pack(data: bytes, model: ModelIdentity, max_bytes: int = MAX_UNPACKED_BYTES,
              max_members: int = MAX_MEMBERS) -> Pack:
    """Unpack and check ``data`` whole; ValueError naming the first problem found."""
    members = _unzip(data, max_bytes, max_members)
    if MANIFEST not in members:
        raise ValueError(f"not a prompt pack: {MANIFEST} is missing")
    try:
        manifest = json.loads(members[MANIFEST])
    except ValueError as exc:
        raise ValueError(f"{MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{MANIFEST} must hold a JSON object")
    if manifest.get("format") != PACK_FORMAT:
        raise ValueError(f"unsupported pack format {manifest.get('format')!r}; this backend reads {PACK_FORMAT}")
    warnings = _check_model(manifest.get("model"), model)
    try:
        settings = validate_settings(manifest.get("settings") or {})
    except ValueError as exc:
        raise ValueError(f"{MANIFEST} settings: {exc}") from None
    records = manifest.get("entries")
    if not isinstance(records, list):
        raise ValueError(f"{MANIFEST} has no entries list")
    entries, seen = [], set()
    for i, record in enumerate(records):
        entry = _entry(record, members, f"entry {i}")
        if entry.task_id in seen:
            raise ValueError(f"entry {i}: task {entry.task_id} appears twice")
        seen.add(entry.task_id)
        entries.append(entry)
    tuned = None
    if manifest.get("tuned") is not None:
        tuned = _tuned(manifest["tuned"], members, model)
    return Pack(manifest, entries, tuned, settings, warnings)


def _unzip(data: bytes, max_bytes: int, max_members: int) -> dict[str, bytes]:
    """Every member's bytes, within the bounds; damaged or lying archives are refused."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError):
        raise ValueError("not a prompt pack: the file is not a zip archive, or it is truncated") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise ValueError(f"the pack has {len(infos)} files; at most {max_members} are accepted")
        declared = sum(i.file_size for i in infos)
        if declared > max_bytes:
            raise ValueError(f"the pack unpacks to {declared} bytes; at most {max_bytes} are accepted")
        members: dict[str, bytes] = {}
        for info in infos:
            if info.filename in members:
                raise ValueError(f"the pack holds {info.filename} twice")
            try:
                with zf.open(info) as fh:
                    content = fh.read(info.file_size + 1)  # a lying size header reads short or long
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
                raise ValueError(f"pack file {info.filename} is damaged: {exc}") from None
            if len(content) != info.file_size:
                raise ValueError(f"pack file {info.filename} is damaged: its size does not match the archive index")
            members[info.filename] = content
    return members


def _check_model(made_for: object, model: ModelIdentity) -> list[str]:
    if not isinstance(made_for, dict) or not isinstance(made_for.get("config"), dict):
        raise ValueError(f"{MANIFEST} does not say which model the pack was made for (model.config)")
    theirs, ours = made_for["config"], json.loads(json.dumps(model.config))
    if theirs != ours:
        diff = [f"{k}: pack {theirs.get(k)!r}, here {ours.get(k)!r}" for k in sorted(set(theirs) | set(ours))
                if theirs.get(k) != ours.get(k)]
        raise ValueError("the pack was made for a SegGPT of another shape (" + "; ".join(diff[:5]) + ")")
    if made_for.get("fingerprint") != model.fingerprint:
        return [f"the pack was made with other weights (fingerprint {made_for.get('fingerprint')!r}, here "
                f"{model.fingerprint!r}); its tuned prompt, if any, was learned for those"]
    return []


def _entry(record: object, members: dict[str, bytes], where: str) -> PromptEntry:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    task_id, annotation_id = _int(record, "task_id", where), _int(record, "annotation_id", where)
    where = f"{where} (task {task_id})"
    updated_at = record.get("updated_at")
    if isinstance(updated_at, bool) or not isinstance(updated_at, (int, float)) or not math.isfinite(updated_at):
        raise ValueError(f"{where}: updated_at must be a number (epoch seconds)")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: meta must be a JSON object")
    images = _named_members(record, "images", members, where)
    maps = _named_members(record, "label_maps", members, where)
    sizes = {}
    for key, data in images.items():
        try:
            with Image.open(io.BytesIO(data)) as image:
                if max(image.size) > MAX_IMAGE_SIDE:
                    raise ValueError(f"{image.size[0]}x{image.size[1]} pixels, over {MAX_IMAGE_SIDE} a side")
                image.load()
                sizes[key] = image.size
        except Exception as exc:  # untrusted bytes: Pillow raises many kinds (OSError, SyntaxError, struct.error)
            raise ValueError(f"{where}: image {key!r} does not decode: {exc}") from None
    for control, data in maps.items():
        label_map, size = _label_map(data, f"{where}: label map {control!r}")
        if size not in sizes.values():
            shown = ", ".join(f"{w}x{h}" for w, h in sizes.values())
            raise ValueError(f"{where}: label map {control!r} is {size[0]}x{size[1]}, its image is {shown}")
        if label_map.max() > MAX_LABELS:
            raise ValueError(f"{where}: label map {control!r} uses label {int(label_map.max())}, beyond the "
                             f"{MAX_LABELS} labels of the palette")
        if not label_map.any():
            raise ValueError(f"{where}: label map {control!r} holds no labelled pixel")
    return PromptEntry(task_id=task_id, annotation_id=annotation_id, updated_at=float(updated_at), images=images,
                       label_maps=maps, meta=meta)


def _label_map(data: bytes, where: str) -> tuple[np.ndarray, tuple[int, int]]:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{where} is not a PNG")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if max(image.size) > MAX_IMAGE_SIDE:
                raise ValueError(f"{image.size[0]}x{image.size[1]} pixels, over {MAX_IMAGE_SIDE} a side")
            if image.mode not in ("L", "P"):
                raise ValueError(f"mode {image.mode}: expected one 8-bit channel of label ids")
            return np.asarray(image), image.size
    except Exception as exc:  # untrusted bytes, as above
        raise ValueError(f"{where} does not decode: {exc}") from None


def _tuned(spec: object, members: dict[str, bytes], model: ModelIdentity) -> tuple[bytes, dict]:
    if not isinstance(spec, dict) or not isinstance(spec.get("file"), str) or not isinstance(spec.get("meta", {}), dict):
        raise ValueError(f"{MANIFEST} tuned must be an object with file and meta")
    if spec["file"] not in members:
        raise ValueError(f"the tuned prompt {spec['file']} is missing from the pack")
    data = members[spec["file"]]
    try:
        check_tuned_prompt(data, model.image_size)
    except ValueError as exc:
        raise ValueError(f"{spec['file']}: {exc}") from None
    return data, spec.get("meta", {})


def _named_members(record: dict, part: str, members: dict[str, bytes], where: str) -> dict[str, bytes]:
    names = record.get(part)
    if not isinstance(names, dict) or not names or not all(isinstance(v, str) for v in names.values()):
        raise ValueError(f"{where}: {part} must map names to pack files")
    missing = [v for v in names.values() if v not in members]
    if missing:
        raise ValueError(f"{where}: {part} names {missing[0]}, which the pack lacks")
    return {k: members[v] for k, v in names.items()}


def _int(record: dict, name: str, where: str) -> int:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
    return value


def _extension(data: bytes) -> str:
    return "jpg" if data.startswith(b"\xff\xd8") else "png" if data.startswith(b"\x89PNG") else "bin"
