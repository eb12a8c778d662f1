"""Prompt tuning for one project: bank entries in, a promoted (or rejected) tuned prompt out.

- **Data.** Every bank entry (an annotated task: a correction or an accepted pre-label)
  is an (image, label map) example per control. A fixed rule splits them: a task is
  held out when the hash of its id is divisible by 4, so a task never moves between the
  sides as the project grows and the gate never scores a prompt on what it learnt from.
  With no such task the one with the smallest hash is held out; fewer than two examples
  of a control is refused.
- **Start.** Tuning starts from the train example with the best one-shot IoU on other
  train examples (the newest few candidates, scored on a few others): a prompt that
  already works is a better starting point than an arbitrary one, and it is cheap.
- **Gate.** Mean IoU on the held-out examples with the candidate vs the current prompt
  state (the current tuned prompt, else the K example prompts, chosen from the train
  examples as in serving); promoted only when it gains at least TUNE_MIN_GAIN.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from backend.bank import Prompt, decode_embedding, entry_prompt
from backend.charts import line_chart
from backend.jobs import RECORD_TTL_S, JobContext, JobError
from backend.jobs import Progress as JobProgress
from backend.label_config import ControlSpec, parse_label_config
from backend.model import SegGPTBackend
from backend.prompting import pack_tuned, prompt_settings, unpack_tuned
from backend.settings import Settings
from backend.store import PromptState, PromptStore
from seggpt_model import SegGPTPredictor
from seggpt_model.predictor import supports_bf16
from seggpt_model.metrics import mean_iou
from seggpt_model.tuning import PromptTuner, TunedPrompt, TuningConfig, choose_init, scale_matched_examples

log = logging.getLogger(__name__)

HELD_OUT_EVERY = 4
INIT_CANDIDATES = 4  # newest train examples considered as the starting prompt
INIT_JUDGES = 8  # train examples each candidate is scored on

Progress = Callable[[int, int, dict], "bool | None"]  # (steps done, steps in all, info) -> False stops


class TuningRefused(ValueError):
    """A tuning run that cannot start; the message says why and what to do."""


@dataclass
class Example:
    task_id: int
    image: object  # PIL image at the bank's working size
    label_map: np.ndarray
    embedding: np.ndarray | None


@dataclass
class ControlData:
    control: ControlSpec
    train: list[Example]
    held_out: list[Example]


@dataclass
class TuneReport:
    """What a run did and why; stored with its job record (the loss chart separately)."""

    project: str
    decision: str = ""  # promoted | kept | stopped
    reason: str = ""
    bank_version: int = 0
    version_before: int = 0
    version_after: int = 0
    controls: dict[str, dict] = field(default_factory=dict)  # per control: sizes, init, IoUs, losses
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def held_out_rank(task_id: int) -> int:
    """A stable pseudo-random number per task: Python's hash() changes between processes."""
    return int.from_bytes(hashlib.sha256(str(int(task_id)).encode()).digest()[:8], "big")


def split_tasks(task_ids: list[int]) -> tuple[list[int], list[int]]:
    """(train, held out) task ids, each in the given order; TuningRefused below two tasks."""
    if len(task_ids) < 2:
        raise TuningRefused(f"tuning needs at least 2 annotated tasks (one to learn from, one to check on), "
                            f"found {len(task_ids)}")
    held = {t for t in task_ids if held_out_rank(t) % HELD_OUT_EVERY == 0}
    if not held:
        held = {min(task_ids, key=held_out_rank)}
    if len(held) == len(task_ids):
        held.discard(max(held, key=held_out_rank))
    return [t for t in task_ids if t not in held], [t for t in task_ids if t in held]


def load_data(store: PromptStore, project: str, controls: list[ControlSpec]
              ) -> tuple[PromptState, list[ControlData], dict]:
    """Examples per control from one version of the bank; controls with too few are skipped.

    Returns (that version's state, data per usable control, {control: why skipped});
    raises TuningRefused when no control can be tuned.
    """
    state, entries = store.entries(project)
    entries = sorted(entries, key=lambda e: (e.updated_at, e.task_id), reverse=True)  # newest first
    data, skipped = [], {}
    for control in controls:
        picked = [e for e in entries if control.name in e.label_maps]
        try:
            train_ids, held_ids = split_tasks([e.task_id for e in picked])
        except TuningRefused as exc:
            skipped[control.name] = str(exc)
            continue
        examples = {}
        for entry in picked:
            image, label_map = entry_prompt(entry, control)
            emb = (entry.meta.get("embeddings") or {}).get(control.value_key)
            examples[entry.task_id] = Example(entry.task_id, image, label_map,
                                              decode_embedding(emb) if emb else None)
        data.append(ControlData(control, [examples[t] for t in train_ids], [examples[t] for t in held_ids]))
    if not data:
        raise TuningRefused("nothing to tune: " + "; ".join(f"{c}: {why}" for c, why in skipped.items()))
    return state, data, skipped


def examples_for(query: Example, train: list[Example], k: int, selection: str) -> list[Prompt]:
    """The ``k`` train examples serving would pick for ``query``: most similar, or newest."""
    order = list(range(len(train)))  # newest first
    if selection == "similar" and query.embedding is not None:
        with_emb = [i for i in order if train[i].embedding is not None]
        if with_emb:
            scores = np.stack([train[i].embedding for i in with_emb]) @ query.embedding
            order = [with_emb[j] for j in np.argsort(-scores, kind="stable")] + \
                    [i for i in order if train[i].embedding is None]
    return [(train[i].image, train[i].label_map) for i in order[:k]]


def held_out_iou(predictor: SegGPTPredictor, data: ControlData, tuned: TunedPrompt | None, k: int,
                 selection: str, tuned_use: str, tiling: str = "auto") -> float:
    """Mean IoU on the held-out examples with the prompts (and tiling) serving would use."""
    num_labels = len(data.control.labels)
    scores = []
    for ex in data.held_out:
        n = k if tuned is None else (0 if tuned_use == "alone" else max(1, k - 1))
        out = predictor.predict(ex.image, examples_for(ex, data.train, n, selection), num_labels=num_labels,
                                tuned=tuned, tiling=tiling)
        scores.append(mean_iou(out.label_map, ex.label_map, num_labels))
    return float(np.mean(scores))


def use_bf16(setting: str, device: torch.device) -> bool:
    """``auto``: bf16 autocast on CUDA devices with bf16, and on CPUs with native bf16 (AVX-512)."""
    if setting != "auto":
        return setting == "true"
    return supports_bf16(device)


class ProjectTuner:
    """Runs one tuning of one project end to end: data, tuning, gate, promotion, report."""

    def __init__(self, settings: Settings, store: PromptStore, predictor: Callable[[], SegGPTPredictor]) -> None:
        self.settings = settings
        self.store = store
        self._predictor = predictor

    def run(self, project: str, controls: list[ControlSpec], progress: Progress | None = None,
            job_id: str | None = None) -> TuneReport:
        """Tune, gate and maybe promote. A stop (``progress`` returning False or raising) or
        any failure promotes nothing; TuningRefused when there is too little to tune on."""
        report = TuneReport(project)
        state, data, skipped = load_data(self.store, project, controls)
        report.bank_version = report.version_before = report.version_after = state.version
        for name, why in skipped.items():
            report.controls[name] = {"skipped": why}
        predictor = self._predictor()
        blob = self.store.tuned_prompt(project, state) if state.tuned else None
        current = unpack_tuned(blob) if blob else {}
        prefs = prompt_settings(state, self.settings)
        candidates: dict[str, TunedPrompt] = {}
        total = self.settings.tune_steps * len(data)
        for n, d in enumerate(data):
            init = d.train[choose_init(predictor, [(e.image, e.label_map) for e in d.train], len(d.control.labels),
                                       INIT_CANDIDATES, INIT_JUDGES)]
            config = TuningConfig(steps=self.settings.tune_steps, lr=self.settings.tune_lr,
                                  batch_size=self.settings.tune_batch, seed=0,
                                  bf16=use_bf16(self.settings.tune_bf16, predictor.device))
            base = n * self.settings.tune_steps

            def on_step(step: int, loss: float, name: str = d.control.name, base: int = base) -> bool:
                info = {"stage": "tuning", "control": name, "loss": loss}
                return progress is None or progress(base + step + 1, total, info) is not False

            train = [(e.image, e.label_map) for e in d.train]
            start = (init.image, init.label_map)
            if prefs["tiling"] == "auto":  # tune on what serving shows the model: crops at the working scale
                train = scale_matched_examples(train, predictor.tiling, predictor.image_size)
                start = scale_matched_examples([start], predictor.tiling, predictor.image_size, max_crops=1)[0]
            result = PromptTuner(predictor.model, config).tune(train, start, on_step)
            report.controls[d.control.name] = {
                "train": len(d.train), "held_out": len(d.held_out), "init_task": init.task_id,
                "steps": len(result.losses), "bf16": config.bf16, "losses": result.losses}
            if not result.completed:
                report.decision, report.reason = "stopped", "stopped on request; the prompt state is unchanged"
                report.finished_at = time.time()
                return report
            candidates[d.control.name] = result.prompt
        if progress is not None:
            progress(total, total, {"stage": "evaluating on the held-out tasks"})
        self.decide(report, data, candidates, state, current, predictor, prefs, job_id)
        return report

    def decide(self, report: TuneReport, data: list[ControlData], candidates: dict[str, TunedPrompt],
               state: PromptState, current: dict[str, TunedPrompt], predictor: SegGPTPredictor, prefs: dict,
               job_id: str | None = None) -> None:
        """The gate: promote the candidates that gain at least TUNE_MIN_GAIN held-out mean IoU
        over ``current`` (the tuned prompts of ``state``, the version the run started from)."""
        k, gain_needed = self.settings.num_prompts, self.settings.tune_min_gain
        winners, reasons = {}, []
        for d in data:
            name = d.control.name
            serving = (k, prefs["prompt_selection"], prefs["tuned_prompt"], prefs["tiling"])
            before = held_out_iou(predictor, d, current.get(name), *serving)
            after = held_out_iou(predictor, d, candidates[name], *serving)
            baseline = "the current tuned prompt" if name in current else f"the {k} example prompts"
            ok = after - before >= gain_needed
            reasons.append(f"{name}: held-out mean IoU {after:.3f} vs {before:.3f} with {baseline} "
                           f"({'gain' if after >= before else 'loss'} {abs(after - before):.3f}, "
                           f"{'at least' if ok else 'below'} the required {gain_needed:.3f})")
            report.controls[name].update(iou_before=before, iou_after=after, baseline=baseline, promoted=ok)
            if ok:
                winners[name] = candidates[name]
        report.reason = "; ".join(reasons)
        report.finished_at = time.time()
        report.decision = "kept"
        if not winners:
            return
        if self.store.state(report.project).tuned != state.tuned:
            report.reason = "the tuned prompt changed while this run was tuning; " + report.reason
            return
        meta = {"job": job_id, "bank_version": state.version, "tuned_at": report.finished_at,
                "controls": {n: {k: v for k, v in report.controls[n].items() if k != "losses"} for n in winners}}
        version = self.store.set_tuned_prompt(report.project, pack_tuned({**current, **winners}), meta)
        report.version_after = version if version is not None else self.store.version(report.project)
        report.decision = "promoted"


def loss_chart(report: TuneReport) -> bytes:
    series = {n: c["losses"] for n, c in report.controls.items() if c.get("losses")}
    return line_chart(series, f"prompt tuning of project {report.project}: {report.decision}", "step",
                      "training loss")


# -- the ``tune`` job and its triggers ------------------------------------------------------
NEEDS_CONFIG = ("tuning needs the project's label config: start it from Label Studio (Start Training), "
                "or give the worker LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")


def loss_chart_key(store: PromptStore, job_id: str) -> str:
    """The loss-curve PNG of a tune job, kept beside its record (and as long)."""
    return f"{store.ns}:job:{job_id}:loss.png"


def run_tune(ctx: JobContext, project: str, params: dict, progress: JobProgress) -> dict:
    """The ``tune`` job: the report (decision, reason, IoUs, losses) becomes the job's result.

    Too little data fails the job with the reason; a stopped or failed job promotes nothing.
    """
    config = params.get("label_config")
    if not config and ctx.client is not None:
        config = ctx.client.get_project(int(project)).get("label_config")
    if not config:
        raise JobError(NEEDS_CONFIG)
    controls = parse_label_config(config)  # ValueError names what cannot be served
    ctx.store.reset_corrections(project)

    def report_step(done: int, total: int, info: dict) -> None:
        what = f"{info['stage']} {info.get('control', '')}".strip()
        message = f"{what}: step {done}/{total}, loss {info['loss']:.4f}" if "loss" in info else what
        progress(done / total if total else 1.0, message, done=done, total=total)

    tuner = ProjectTuner(ctx.settings, ctx.store, SegGPTBackend(ctx.settings, ctx.store, client=ctx.client).predictor)
    try:
        report = tuner.run(project, controls, report_step, job_id=ctx.job_id)
    except TuningRefused as exc:
        raise JobError(str(exc)) from None
    ctx.store.redis.set(loss_chart_key(ctx.store, ctx.job_id), loss_chart(report), ex=RECORD_TTL_S)
    log.info("tune job %s of project %s: %s", ctx.job_id, project, report.decision)
    return {"message": f"{report.decision}: {report.reason}", "loss_png": f"/jobs/{ctx.job_id}/loss.png",
            **report.to_dict()}
