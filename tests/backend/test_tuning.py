"""Prompt tuning and prompt selection on a tiny random-weight SegGPT, real Redis and real HTTP."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from backend.bank import PromptBank
from backend.label_config import parse_label_config
from backend.media import MediaFetcher
from backend.prompting import PromptSelector, unpack_tuned
from backend.results import label_map_to_results
from backend.settings import Settings
from backend.tuning import (HELD_OUT_EVERY, ProjectTuner, TuneReport, TuningRefused, examples_for, held_out_rank,
                            load_data, split_tasks)
from seggpt_model import SegGPTPredictor
from seggpt_model.testing import random_model
from seggpt_model.tuning import TunedPrompt

PROJECT = "1"


@pytest.fixture(scope="module")
def predictor() -> SegGPTPredictor:
    return SegGPTPredictor(random_model(), device="cpu")


@pytest.fixture
def settings(tmp_path, image_server) -> Settings:
    return Settings(model_dir=tmp_path, device="cpu", allowed_media_hosts=(image_server.host,), num_prompts=2,
                    min_region_area=1, tune_steps=4, tune_batch=2, tune_bf16="false")


@pytest.fixture
def bank(settings, store) -> PromptBank:
    return PromptBank(store, MediaFetcher(settings))


def annotate(bank: PromptBank, image_server, config: str, task_ids, **scene) -> None:
    """One brush annotation per task: the scene's square, shifted per task."""
    control = parse_label_config(config)[0]
    for t in task_ids:
        kwargs = {"box": (4 + t % 9, 6, 28 + t % 9, 36), "seed": t, **scene}
        url, label_map = image_server.add_scene(f"task{t}.png", **kwargs)
        annotation = {"id": 1000 + t, "was_cancelled": False, "updated_at": f"2026-11-24T20:{t // 60:02d}:{t % 60:02d}Z",
                      "result": label_map_to_results(label_map, None, control, min_area=1)}
        assert bank.add_annotation(PROJECT, {"id": t, "data": {"image": url}}, annotation, [control]) is not None


def test_the_split_is_fixed_by_task_id_and_keeps_both_sides() -> None:
    ids = list(range(1, 41))
    train, held = split_tasks(ids)
    assert held == [t for t in ids if held_out_rank(t) % HELD_OUT_EVERY == 0] and 4 <= len(held) <= 16
    assert sorted(train + held) == ids
    # a growing project never moves a held-out task into training
    assert set(held) <= set(split_tasks(ids + list(range(41, 90)))[1])
    assert held_out_rank(7) == held_out_rank(7) and held_out_rank(7) != held_out_rank(8)

    few = [t for t in range(1, 100) if held_out_rank(t) % HELD_OUT_EVERY][:3]  # none held out by the rule
    train, held = split_tasks(few)
    assert held == [min(few, key=held_out_rank)] and len(train) == 2
    all_held = [t for t in range(1, 100) if held_out_rank(t) % HELD_OUT_EVERY == 0][:2]
    train, held = split_tasks(all_held)
    assert len(train) == 1 and len(held) == 1
    with pytest.raises(TuningRefused, match="at least 2 annotated tasks.*found 1"):
        split_tasks([5])


def test_too_few_annotations_are_refused_with_the_reason(settings, store, bank, image_server, brush_config,
                                                         predictor) -> None:
    controls = parse_label_config(brush_config)
    with pytest.raises(TuningRefused, match="nothing to tune: tag: .*found 0"):
        load_data(store, PROJECT, controls)
    annotate(bank, image_server, brush_config, [3])
    with pytest.raises(TuningRefused, match="found 1"):
        ProjectTuner(settings, store, lambda: predictor).run(PROJECT, controls)
    assert store.version(PROJECT) == 1 and store.tuned_prompt(PROJECT) is None


def test_tuning_lowers_the_loss_reports_each_step_and_promotes_a_new_version(settings, store, bank, image_server,
                                                                             brush_config, predictor) -> None:
    annotate(bank, image_server, brush_config, range(1, 9))
    controls = parse_label_config(brush_config)
    before = store.version(PROJECT)
    steps = []
    tuner = ProjectTuner(replace(settings, tune_steps=20, tune_min_gain=-1.0), store, lambda: predictor)
    report = tuner.run(PROJECT, controls, lambda done, total, info: steps.append((done, total, info)))

    losses = report.controls["tag"]["losses"]
    assert len(losses) == 20 and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert [s[0] for s in steps[:20]] == list(range(1, 21)) and all(s[1] == 20 for s in steps)
    assert all(s[2]["loss"] == loss for s, loss in zip(steps, losses))
    _, held = split_tasks(list(range(1, 9)))
    tag = report.controls["tag"]
    assert (tag["train"], tag["held_out"]) == (8 - len(held), len(held))
    assert report.decision == "promoted" and report.version_before == before
    assert report.version_after == store.version(PROJECT) == before + 1
    stored = unpack_tuned(store.tuned_prompt(PROJECT))
    assert list(stored) == ["tag"] and stored["tag"].num_labels == 1  # only "Cat" was ever drawn
    assert store.state(PROJECT).tuned["meta"]["controls"]["tag"]["iou_after"] == tag["iou_after"]
    assert all(p.requires_grad for p in predictor.model.parameters())  # the tuner gave the model back


def _noise(seed: int, size: int) -> TunedPrompt:
    g = torch.Generator().manual_seed(seed)
    return TunedPrompt(torch.randn(3, size, size, generator=g) * 3, torch.randn(3, size, size, generator=g) * 3, 2)


def test_the_gate_rejects_a_worse_prompt_and_says_why(settings, store, bank, image_server, brush_config,
                                                      predictor) -> None:
    """The held-out tasks' annotations are the current pre-labels, accepted unchanged: the current
    state scores 1.0 on them, so a noise prompt that changes any prediction must lose."""
    annotate(bank, image_server, brush_config, range(1, 9))
    controls = parse_label_config(brush_config)
    _, data, _ = load_data(store, PROJECT, controls)
    [d] = data
    for n, ex in enumerate(d.held_out):  # accept the pre-label the current state gives this task
        accepted = predictor.predict(ex.image, examples_for(ex, d.train, 2, "similar"), num_labels=2).label_map
        assert accepted.any()
        annotation = {"id": 2000 + n, "was_cancelled": False, "updated_at": "2026-11-25T10:00:00Z",
                      "result": label_map_to_results(accepted, None, controls[0], min_area=1)}
        url = image_server.url(f"task{ex.task_id}.png")
        bank.add_annotation(PROJECT, {"id": ex.task_id, "data": {"image": url}}, annotation, controls)
    state, data, _ = load_data(store, PROJECT, controls)
    report = TuneReport(PROJECT, version_before=state.version, version_after=state.version)
    report.controls["tag"] = {}
    prefs = {"prompt_selection": "similar", "tuned_prompt": "alone", "tiling": "auto"}
    tuner = ProjectTuner(settings, store, lambda: predictor)
    tuner.decide(report, data, {"tag": _noise(0, predictor.image_size)}, state, {}, predictor, prefs)

    tag = report.controls["tag"]
    assert tag["iou_before"] == 1.0 and tag["iou_after"] < 1.0
    assert report.decision == "kept" and tag["promoted"] is False
    assert f"held-out mean IoU {tag['iou_after']:.3f} vs 1.000 with the 2 example prompts" in report.reason
    assert "below the required 0.010" in report.reason
    assert store.version(PROJECT) == state.version and store.tuned_prompt(PROJECT) is None


@pytest.mark.parametrize("how", ["stop", "crash"])
def test_an_interrupted_run_leaves_the_current_version_untouched(settings, store, bank, image_server, brush_config,
                                                                 predictor, how) -> None:
    annotate(bank, image_server, brush_config, range(1, 7))
    controls = parse_label_config(brush_config)
    first = ProjectTuner(replace(settings, tune_min_gain=-1.0), store, lambda: predictor).run(PROJECT, controls)
    assert first.decision == "promoted"
    version, tuned = store.version(PROJECT), store.tuned_prompt(PROJECT)

    def interrupt(done: int, total: int, info: dict) -> bool:
        if done == 3:
            if how == "crash":
                raise KeyboardInterrupt
            return False
        return True

    tuner = ProjectTuner(replace(settings, tune_min_gain=-1.0), store, lambda: predictor)
    if how == "crash":
        with pytest.raises(KeyboardInterrupt):
            tuner.run(PROJECT, controls, interrupt)
    else:
        report = tuner.run(PROJECT, controls, interrupt)
        assert report.decision == "stopped" and report.controls["tag"]["steps"] == 3
    assert store.version(PROJECT) == version and store.tuned_prompt(PROJECT) == tuned
    assert all(p.requires_grad for p in predictor.model.parameters())


def test_retrieval_picks_the_most_similar_entry(settings, store, bank, image_server, brush_config) -> None:
    controls = parse_label_config(brush_config)
    # three looks: dark noise with a red square, and two brighter scenes that differ in layout
    annotate(bank, image_server, brush_config, [1])
    annotate(bank, image_server, brush_config, [2], size=(64, 48), box=(0, 0, 64, 20))
    annotate(bank, image_server, brush_config, [3], size=(64, 48), box=(30, 20, 60, 46))
    query, _ = image_server.add_scene("query.png", size=(64, 48), box=(0, 0, 64, 18), seed=77)
    image = bank.media.load_image(query)
    selector = PromptSelector(store, replace(settings, num_prompts=1))

    similar = selector.select(PROJECT, controls, 1, lambda i, key: image)
    assert similar.picked == [{"tag": [2]}] and similar.version == store.version(PROJECT)
    got_image, got_map = similar.prompts[0]["tag"][0]  # task 2's image and label map
    assert got_map.shape == (48, 64) and (got_map > 0).sum() == 64 * 20 and got_image.size == (64, 48)
    assert selector.select(PROJECT, controls, 1, lambda i, key: None).picked == [{"tag": [3]}]  # the newest
    store.update_settings(PROJECT, {"prompt_selection": "recent"})
    assert selector.select(PROJECT, controls, 1, lambda i, key: image).picked == [{"tag": [3]}]


def test_tuning_and_selection_settings_from_the_environment() -> None:
    s = Settings.from_env({"TUNE_STEPS": "30", "TUNE_LR": "0.05", "TUNE_BATCH": "2", "TUNE_BF16": "TRUE",
                           "TUNE_MIN_GAIN": "0.02", "TUNE_EVERY_N_CORRECTIONS": "10", "PROMPT_SELECTION": "recent",
                           "TUNED_PROMPT": "alone"})
    assert (s.tune_steps, s.tune_lr, s.tune_batch, s.tune_bf16, s.tune_min_gain, s.tune_every_n_corrections,
            s.prompt_selection, s.tuned_prompt) == (30, 0.05, 2, "true", 0.02, 10, "recent", "alone")
    d = Settings.from_env({})
    assert (d.tune_steps, d.tune_lr, d.tune_batch, d.tune_bf16, d.tune_min_gain, d.tune_every_n_corrections,
            d.prompt_selection, d.tuned_prompt) == (100, 0.03, 4, "auto", 0.01, 0, "similar", "ensemble")
    for name, value, problem in [("TUNE_STEPS", "0", "at least 1"), ("TUNE_LR", "-1", "positive"),
                                 ("TUNE_MIN_GAIN", "2", "within [-1, 1]"), ("PROMPT_SELECTION", "best", "one of"),
                                 ("TUNE_BF16", "maybe", "one of"), ("TUNE_EVERY_N_CORRECTIONS", "x", "integer")]:
        with pytest.raises(ValueError, match=f"{name}: .*{re.escape(problem)}"):
            Settings.from_env({name: value})
