"""Which prompts a query gets: the project's tuned prompt and the bank entries that suit it.

With ``similar`` selection each query is prompted by the K entries whose images look most
like it (cosine of :func:`seggpt_model.retrieval.embed_image` vectors stored with each
entry); with ``recent`` by the K newest. A tuned prompt is used alone or ensembled with
K - 1 selected entries, per project. Everything one batch uses is read at one prompt-state
version, so a prediction never mixes prompts of two versions under one model_version.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load, save

from backend.bank import Prompt, decode_embedding, entry_prompt
from backend.label_config import ControlSpec
from backend.settings import Settings
from backend.store import PromptState, PromptStore
from seggpt_model.retrieval import embed_image, most_similar
from seggpt_model.tuning import TunedPrompt


@dataclass
class PromptChoice:
    version: int
    prompts: list[dict[str, list[Prompt]]]  # per query: control name -> example prompts, best first
    tuned: dict[str, TunedPrompt]  # control name -> the tuned prompt in use
    picked: list[dict[str, list[int]]]  # per query: control name -> task ids of the example prompts
    settings: dict[str, str] = field(default_factory=dict)  # the project's prompt settings in effect

    def has_prompts(self) -> bool:
        return bool(self.tuned) or any(any(p.values()) for p in self.prompts)


def pack_tuned(prompts: dict[str, TunedPrompt]) -> bytes:
    """One blob for all controls of a project (what the store keeps per version).

    safetensors holding each control's own safetensors bytes: never pickle, and each
    part is validated by :meth:`TunedPrompt.from_bytes` when read back.
    """
    if not prompts:
        raise ValueError("no tuned prompt to pack")
    return save({name: torch.frombuffer(bytearray(p.to_bytes()), dtype=torch.uint8) for name, p in prompts.items()},
                metadata={"format": "seggpt-tuned-prompts/1"})


def unpack_tuned(data: bytes) -> dict[str, TunedPrompt]:
    """Inverse of :func:`pack_tuned`; ValueError naming the problem for anything else."""
    try:
        parts = load(data)
    except Exception as exc:
        raise ValueError(f"not a tuned-prompt blob: {type(exc).__name__}") from None
    return {name: TunedPrompt.from_bytes(t.numpy().tobytes()) for name, t in parts.items()}


def prompt_settings(state: PromptState, defaults: Settings) -> dict[str, str]:
    """The project's prompt settings at ``state``: its own values over the deployment's."""
    own = dict(state.settings)
    return {"prompt_selection": str(own.get("prompt_selection", defaults.prompt_selection)),
            "tuned_prompt": str(own.get("tuned_prompt", defaults.tuned_prompt)),
            "tiling": str(own.get("tiling", defaults.tiling))}


class PromptSelector:
    """Chooses the prompts of a batch of queries from one version of the prompt state."""

    def __init__(self, store: PromptStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def select(self, project: str, controls: list[ControlSpec], count: int,
               query_image: Callable[[int, str], Image.Image | None],
               query_tasks: Sequence[int | None] = ()) -> PromptChoice:
        """Prompts for ``count`` queries; ``query_image(i, data key)`` is query i's image
        (None when unreadable: it gets the newest entries), asked only for ``similar``.
        ``query_tasks[i]`` is query i's task id: a task is never prompted by its own
        annotation (opening an annotated task would otherwise "predict" the annotation back).

        Everything comes from one manifest; should it leave the history while its bytes
        are read (many changes in between), the selection starts over on the new one.
        """
        names = {c.name for c in controls}
        embedded: dict[tuple[int, str], np.ndarray | None] = {}

        def embedding(i: int, key: str) -> np.ndarray | None:  # once per query image
            if (i, key) not in embedded:
                image = query_image(i, key)
                embedded[i, key] = embed_image(image) if image is not None else None
            return embedded[i, key]

        while True:
            state = self.store.state(project)
            prefs = prompt_settings(state, self.settings)
            blob = self.store.tuned_prompt(project, state) if state.tuned else None
            tuned = {n: p for n, p in (unpack_tuned(blob) if blob else {}).items() if n in names}
            picked: list[dict[str, list[int]]] = [{} for _ in range(count)]
            for control in controls:
                k = self.settings.num_prompts
                if control.name in tuned:
                    k = 0 if prefs["tuned_prompt"] == "alone" else max(1, k - 1)
                metas = self.store.entry_metas(project, control.name, state) if k else []
                for i in range(count):
                    own = query_tasks[i] if i < len(query_tasks) else None
                    others = [m for m in metas if own is None or m["task_id"] != own]
                    similar = prefs["prompt_selection"] == "similar" and len(others) > k
                    emb = embedding(i, control.value_key) if similar else None
                    picked[i][control.name] = rank(others, control.value_key, emb)[:k]
            needed = {t for p in picked for ts in p.values() for t in ts}
            read, entries = self.store.entries(project, replace(state, entries={t: state.entries[t] for t in needed}))
            if read.version == state.version:
                break
        by_task = {e.task_id: e for e in entries}
        by_control = {c.name: c for c in controls}
        decoded: dict[tuple[int, str], Prompt] = {}

        def prompt(task_id: int, name: str) -> Prompt:  # decoded once per batch
            if (task_id, name) not in decoded:
                decoded[task_id, name] = entry_prompt(by_task[task_id], by_control[name])
            return decoded[task_id, name]

        prompts = [{name: [prompt(t, name) for t in ts] for name, ts in p.items()} for p in picked]
        return PromptChoice(state.version, prompts, tuned, picked, prefs)


def rank(metas: list[dict], image_key: str, query: np.ndarray | None) -> list[int]:
    """Task ids of ``metas`` (newest first), most similar to ``query`` first when given.

    Entries stored before embeddings existed rank after those with one, newest first.
    """
    if query is None:
        return [m["task_id"] for m in metas]
    with_emb = [m for m in metas if image_key in (m.get("embeddings") or {})]
    without = [m["task_id"] for m in metas if image_key not in (m.get("embeddings") or {})]
    if not with_emb:
        return without
    bank = np.stack([decode_embedding(m["embeddings"][image_key]) for m in with_emb])
    order = most_similar(query, bank, len(with_emb))  # stable: ties keep the newest first
    return [with_emb[i]["task_id"] for i in order] + without
