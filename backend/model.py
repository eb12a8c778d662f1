"""SegGPTBackend: Label Studio's predict/fit contract over the prompt bank and SegGPT.

Shaped like label-studio-ml's ``LabelStudioMLBase`` (``setup``, ``predict(tasks, context)``,
``fit(event, data)``), but one long-lived object serves every project: per-project state
lives in Redis, and the model is loaded once per process, on the first prediction that
needs it, so ``/setup`` and ``/health`` stay instant.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import asdict, replace
from functools import lru_cache
from typing import Any

from backend.bank import PromptBank, Prompt
from backend.jobs import JobQueue
from backend.label_config import ControlSpec, parse_label_config
from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.media import MediaError, MediaFetcher
from backend.problems import BACKFILL_PROBLEM, describe, fix_for
from backend.prompting import PromptSelector
from backend.results import label_map_to_results, prediction_score
from backend.settings import Settings
from backend.store import PromptStore, model_version as version_string
from seggpt_model import SegGPTPredictor, load_seggpt
from seggpt_model.tiling import TilingConfig
from seggpt_model.tuning import TunedPrompt
from seggpt_model.weights import DEMO_WEIGHTS, read_config, resolve_source

log = logging.getLogger(__name__)

NO_PROMPTS = ("no annotated examples yet: annotate a few tasks (brush, polygon or rectangle regions); "
              "they become SegGPT's prompts and the remaining tasks are pre-labelled from them")
NO_CLIENT = ("; annotations saved before the backend was connected are read from Label Studio only when "
             "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are set on the backend")
BACKFILLING = "no prompts yet: the project's existing annotations are being read from Label Studio; retry shortly"
ONLY_OWN_EXAMPLE = ("this task's own annotation is the project's only example, and a task is never prompted by "
                    "itself: annotate another task")
SETUP_WAIT_S = 2.0  # /setup waits this long for a backfill it started (Label Studio gives /setup 3 s)
PREDICT_WAIT_S = 60.0  # /predict waits this long for a running backfill (Label Studio gives /predict 100 s)
BACKFILL_RETRY_S = 300.0  # a project whose annotations could not all be used is read again after this long
PROMPT_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED",
                           "ANNOTATIONS_DELETED", "TASKS_DELETED"})  # webhooks that change the bank
DEMO_WARNING = ("SEGGPT_WEIGHTS=demo: serving the small bundled demo model trained on generated shapes; "
                "its pre-labels are a demonstration, not SegGPT ViT-L quality")
SAMPLE_BYTES = 1 << 20  # head and tail of a checkpoint that identify it


class LabelConfigError(ValueError):
    """The project's label config has nothing this backend can serve."""


class ProjectUnservable(RuntimeError):
    """Nothing in the project can become a prompt, for a reason the operator has to fix.

    ``reason`` is the whole story (which annotation, what failed); ``fix`` the short
    instruction naming the setting to change.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix_for(reason)


def project_key(project: str | int) -> str:
    """The project id: Label Studio sends ``"<id>.<created timestamp>"`` to /setup and
    /predict but the bare id in webhooks, and both must reach the same prompt bank."""
    key = str(project).split(".", 1)[0]
    if not (key.isascii() and key.isdigit() and len(key) <= 19):  # ASCII: "²".isdigit() is true as well
        raise ValueError(f"project must be a Label Studio project id like '3' or '3.1718000000', "
                         f"got {str(project)[:40]!r}")
    return key


@lru_cache(maxsize=64)
def controls_of(label_config: str) -> tuple[ControlSpec, ...]:
    """Parsed once per distinct config: every request carries the config."""
    try:
        return tuple(parse_label_config(label_config))
    except ValueError as exc:
        raise LabelConfigError(str(exc)) from None


def weights_fingerprint(source: str | None) -> str:
    """Identify the configured checkpoint without loading it (size, head and tail bytes).

    ``/setup`` must answer before the model is loaded, yet report the same model_version
    as ``/predict`` afterwards and as every other replica holding the same file.
    """
    path = resolve_source(source)
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(SAMPLE_BYTES))
        fh.seek(max(0, path.stat().st_size - SAMPLE_BYTES))
        digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()[:12]


class SegGPTBackend:
    """Pre-labels tasks with SegGPT, prompted by each project's most recent annotations."""

    model_class = "SegGPTBackend"

    def __init__(self, settings: Settings, store: PromptStore, media: MediaFetcher | None = None,
                 client: LabelStudioClient | None = None, predictor: SegGPTPredictor | None = None) -> None:
        """``predictor`` injects a ready model (tests); otherwise SEGGPT_WEIGHTS is loaded lazily."""
        self.settings = settings
        self.store = store
        self.jobs = JobQueue(store)
        self.bank = PromptBank(store, media or MediaFetcher(settings, client))
        self.selector = PromptSelector(store, settings)
        self.client = client
        self._predictor = predictor
        self.fingerprint = predictor.fingerprint if predictor else weights_fingerprint(settings.seggpt_weights)
        self.demo = bool(getattr(predictor.model, "is_demo", False)) if predictor else (
            resolve_source(settings.seggpt_weights) == DEMO_WEIGHTS)
        if self.demo:
            log.warning(DEMO_WARNING)
        self._model_lock = threading.Lock()
        self._backfill_lock = threading.Lock()
        self._backfills: dict[str, threading.Thread] = {}  # running backfills of this process
        self._backfill_tried: dict[str, float] = {}  # when this process last started one, per project

    @property
    def model_loaded(self) -> bool:
        return self._predictor is not None

    def model_version(self, project: str | int) -> str:
        return version_string(self.fingerprint, self.store.version(project_key(project)))

    def model_config(self) -> dict:
        """The model's shape (SegGPTConfig.to_dict()), read off the checkpoint without loading it."""
        if self._predictor is not None:
            return self._predictor.model.config.to_dict()
        return read_config(self.settings.seggpt_weights).to_dict()

    # -- Label Studio contract -----------------------------------------------------------
    def setup(self, project: str | int, schema: str, extra_params: Any = None) -> str:
        """Validate the config and return the project's model_version; never loads weights.

        A backfill it starts may finish within ``SETUP_WAIT_S``, so the version returned is
        the one predictions will be made from. Raises ProjectUnservable when the project has
        annotations but none could become a prompt (Label Studio then shows the backend as
        failed and stores no predictions). ``extra_params`` is accepted for Label Studio's
        sake; nothing reads it yet.
        """
        key = project_key(project)
        controls = controls_of(schema)
        self.store.register_project(key)
        if self._start_backfill(key, controls):  # not one already under way: /setup calls come often
            self._await_backfill(key, SETUP_WAIT_S)
        if not self._backfilling(key) and not self._has_prompts(key):
            problem = describe(self.store.problems(key))
            if problem:
                raise ProjectUnservable(problem)
        return self.model_version(key)

    def predict(self, tasks: list[dict], context: dict | None = None, *, project: str | int,
                label_config: str, **kwargs: Any) -> list[dict]:
        """Exactly one prediction per task, in order.

        A task that cannot be predicted (unreadable image, no prompts yet) gets a ``reason``
        and, for batch requests, no ``result``: Label Studio skips such entries, so no empty
        prediction is stored that would keep the task from being predicted once the cause is
        fixed. Interactive calls (``context`` set) get the same prediction with an empty
        ``result``; SegGPT is prompted by examples, not by clicks.
        """
        key = project_key(project)
        controls = controls_of(label_config)
        self._start_backfill(key, controls)
        self._await_backfill(key, PREDICT_WAIT_S)
        if not self._has_prompts(key):  # annotations in the request itself can still become prompts
            self.bank.backfill(key, list(controls), [t for t in tasks if t.get("annotations")])
        choice = self.selector.select(key, list(controls), len(tasks), lambda i, k: self._query_image(tasks[i], k),
                                      [_task_id(t) for t in tasks])
        current = version_string(self.fingerprint, choice.version)
        if not choice.has_prompts():
            reason = self.no_prompts_reason(key)
            return [_unpredicted(current, reason, context) for _ in tasks]
        predictor = self._load()
        tiling = choice.settings.get("tiling", self.settings.tiling)
        return [self._predict_task(task, controls, prompts, choice.tuned, predictor, current, context, tiling)
                for task, prompts in zip(tasks, choice.prompts)]

    def no_prompts_reason(self, key: str) -> str:
        """Why a project has no prompts: what failed and the setting to change, else what to do."""
        problem = describe(self.store.problems(key))
        if problem:
            return f"{problem}; {fix_for(problem)}"
        if self._backfilling(key):
            return BACKFILLING
        return NO_PROMPTS + (NO_CLIENT if self.client is None else "")

    def fit(self, event: str, data: dict, **kwargs: Any) -> dict:
        """Apply a webhook event to the prompt bank; returns what happened, for the response.

        Raises ValueError when a handled event does not name its project.
        """
        if event not in PROMPT_EVENTS and event != "START_TRAINING":
            return {"status": "ignored", "reason": f"{event} does not change the prompts"}
        project = data.get("project")
        key = project_key(project.get("id") if isinstance(project, dict) else project)
        if event in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"):
            config = project.get("label_config") if isinstance(project, dict) else None
            if not config:
                return {"status": "ignored", "reason": "the webhook payload carries no project label_config"}
            return self._add_annotations(key, data, config)
        if event == "ANNOTATIONS_DELETED":
            ids = [a["id"] for a in data.get("annotations") or []]
            return self._changed(key, self.bank.remove_annotations(key, ids))
        if event == "TASKS_DELETED":
            return self._changed(key, self.bank.remove_tasks(key, [t["id"] for t in data.get("tasks") or []]))
        # START_TRAINING: a background tune job (joined if one is active); answered at once
        config = project.get("label_config") if isinstance(project, dict) else None
        job, created = self.jobs.submit(key, "tune", {"trigger": "start_training", "label_config": config}
                                        if config else {"trigger": "start_training"})
        return {"status": job["status"] if created else "joined", "job": job["id"],
                "message": job.get("reason") or job["message"], "model_version": self.model_version(key)}

    # -- internals -----------------------------------------------------------------------
    def _add_annotations(self, key: str, data: dict, config: str) -> dict:
        controls = list(controls_of(config))
        annotations, tasks = data.get("annotation"), data.get("task")
        if isinstance(annotations, dict):  # single-annotation events
            annotations, tasks = [annotations], [tasks]
        by_id = {t.get("id"): t for t in tasks or [] if isinstance(t, dict)}
        version, changed, failed = None, 0, []
        for annotation in annotations or []:
            task = by_id.get(annotation.get("task"))
            if task is None:
                log.warning("annotation %s of project %s arrived without its task", annotation.get("id"), key)
                continue
            try:
                added = self.bank.add_annotation(key, task, annotation, controls)
            except ValueError as exc:  # MediaError included; recorded for the project by the bank
                log.warning("annotation %s of project %s is no prompt: %s", annotation.get("id"), key, exc)
                failed.append(str(exc))
                continue
            version, changed = added or version, changed + (added is not None)
        if self.store.count_corrections(key, changed, self.settings.tune_every_n_corrections):
            self.jobs.submit(key, "tune", {"trigger": "corrections", "label_config": config})  # joins an active one
        result = self._changed(key, version)
        if failed and version is None:
            result.update(status="not_applied", reason=f"{failed[-1]}; {fix_for(failed[-1])}")
        return result

    def _changed(self, key: str, version: int | None) -> dict:
        return {"status": "updated" if version is not None else "unchanged",
                "model_version": self.model_version(key)}

    def _predict_task(self, task: dict, controls: tuple[ControlSpec, ...], prompts: dict[str, list[Prompt]],
                      tuned: dict[str, TunedPrompt], predictor: SegGPTPredictor, current: str,
                      context: dict | None, tiling: str) -> dict:
        if not tuned and not any(prompts.values()):  # its own annotation is the project's only example
            return _unpredicted(current, ONLY_OWN_EXAMPLE, context)
        images = {}
        results: list[dict] = []
        painted: dict[str, dict] = {}
        for control in controls:
            if not prompts.get(control.name) and control.name not in tuned:
                continue
            try:
                if control.value_key not in images:
                    url = (task.get("data") or {}).get(control.value_key)
                    if not isinstance(url, str) or not url:
                        raise MediaError(f"task data has no image URL under {control.value_key!r}")
                    images[control.value_key] = self.bank.media.load_image(url, task_id=task.get("id"))
            except MediaError as exc:
                log.warning("task %s not predicted: %s", task.get("id"), exc)
                reason = f"the task image could not be read: {exc}"
                return _unpredicted(current, f"{reason}; {fix_for(reason)}", context)
            with self._model_lock:
                out = predictor.predict(images[control.value_key], prompts.get(control.name, []),
                                        num_labels=len(control.labels), seg_type="instance",
                                        tuned=tuned.get(control.name), tiling=tiling)
            results += label_map_to_results(out.label_map, out.scores, control,
                                            min_area=self.settings.min_region_area,
                                            polygon_max_points=self.settings.polygon_max_points)
            if out.tiling is not None:
                painted[control.name] = asdict(out.tiling)
        # "tiling" says per control how it was painted (scale, tiles); Label Studio ignores the key
        return {"result": results, "score": prediction_score(results), "model_version": current, "tiling": painted}

    def predictor(self) -> SegGPTPredictor:
        """The model, loaded on first use; prompt tuning runs on the same one."""
        return self._load()

    def _query_image(self, task: dict, key: str):
        """A task's image for prompt selection; None when unreadable (predicting says why)."""
        url = (task.get("data") or {}).get(key)
        try:
            return self.bank.media.load_image(url, task_id=task.get("id")) if isinstance(url, str) and url else None
        except MediaError:
            return None

    def _load(self) -> SegGPTPredictor:
        with self._model_lock:
            if self._predictor is None:
                log.info("loading SegGPT weights (device %s, dtype %s)", self.settings.device, self.settings.dtype)
                model = load_seggpt(self.settings.seggpt_weights)
                tiling = TilingConfig.for_model(model.config)
                self._predictor = SegGPTPredictor(model, device=self.settings.device, dtype=self.settings.dtype,
                                                  tiling=replace(tiling, max_tiles=self.settings.max_tiles))
            return self._predictor

    def _has_prompts(self, key: str) -> bool:
        state = self.store.state(key)
        return bool(state.entries or state.tuned)

    def _backfilling(self, key: str) -> bool:
        thread = self._backfills.get(key)
        return thread is not None and thread.is_alive()

    def _await_backfill(self, key: str, timeout: float) -> None:
        thread = self._backfills.get(key)
        if thread is not None:
            thread.join(timeout)

    def _start_backfill(self, key: str, controls: tuple[ControlSpec, ...]) -> bool:
        """Read the project's annotations from the Label Studio API, in the background; True if started.

        Once per project (``PromptStore.is_backfilled``), and again, at most every
        ``BACKFILL_RETRY_S`` and first thing after a restart, while annotations of the project
        could not become prompts: the cause (settings, an image host) may have been fixed.
        """
        if self.client is None:
            return False
        with self._backfill_lock:
            if self._backfilling(key):
                return False
            retry = bool(self.store.problems(key))
            if self.store.is_backfilled(key) and not retry:
                return False
            if time.monotonic() - self._backfill_tried.get(key, float("-inf")) < BACKFILL_RETRY_S and retry:
                return False
            self._backfill_tried[key] = time.monotonic()
            thread = threading.Thread(target=self._backfill, args=(key, controls, retry),
                                      name=f"backfill-{key}", daemon=True)
            self._backfills[key] = thread
            thread.start()
            return True

    def _backfill(self, key: str, controls: tuple[ControlSpec, ...], retry: bool) -> None:
        try:
            self.bank.backfill_once(key, list(controls), lambda: self.client.iter_tasks(int(key)), retry=retry)
        except LabelStudioError as exc:  # token rejected, Label Studio unreachable: named in predictions
            log.warning("reading project %s's annotations from Label Studio failed: %s", key, exc)
            self.store.record_problem(key, BACKFILL_PROBLEM, str(exc))
        except Exception as exc:  # logged without details: messages may carry URLs
            log.warning("backfill of project %s failed (%s); retried later", key, type(exc).__name__)
            log.debug("backfill failure", exc_info=True)
        else:
            self.store.clear_problems(key, [BACKFILL_PROBLEM])


def _task_id(task: dict) -> int | None:
    try:
        return int(task["id"])
    except (KeyError, TypeError, ValueError):
        return None


def _unpredicted(current: str, reason: str, context: dict | None) -> dict:
    """A task that cannot be predicted: batch answers carry no ``result``, so Label Studio stores nothing."""
    entry = {"score": 0.0, "model_version": current, "reason": reason}
    return {"result": [], **entry} if context else entry
