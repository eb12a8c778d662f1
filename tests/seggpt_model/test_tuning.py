"""In-context tuning: a frozen model, a learnable prompt, a lower training loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seggpt_model import SegGPTPredictor
from seggpt_model.episodes import make_episode
from seggpt_model.metrics import mean_iou
from seggpt_model.retrieval import embed_image, most_similar
from seggpt_model.tuning import PromptTuner, TunedPrompt, TuningConfig, choose_init


@pytest.fixture
def examples():
    eps = [make_episode(i, size=80) for i in range(6)]
    return [(e.query_image, e.query_labels) for e in eps], (eps[0].prompt_image, eps[0].prompt_labels)


def test_tuning_lowers_the_loss_and_never_touches_the_model(tiny_model, examples):
    train, init = examples
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    res = PromptTuner(tiny_model, TuningConfig(steps=40, lr=0.1, batch_size=4, fg_weight=1.0)).tune(train, init)
    assert len(res.losses) == 40 and res.completed
    assert np.mean(res.losses[-5:]) < 0.95 * np.mean(res.losses[:5])
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert all(p.requires_grad for p in tiny_model.parameters())  # flags restored
    assert res.prompt.image.shape == (3, 64, 64) and res.prompt.mask.shape == (3, 64, 64)


def test_foreground_weight_raises_the_cost_of_missed_labels(tiny_model, examples):
    """The random model misses the bright label colours most, so weighting them up raises the loss."""
    train, init = examples
    losses = [PromptTuner(tiny_model, TuningConfig(steps=1, fg_weight=w)).tune(train, init).losses[0]
              for w in (1.0, 3.0, 10.0)]
    assert losses[0] < losses[1] < losses[2]


def test_choose_init_picks_the_example_that_predicts_the_others_best(tiny_model, examples):
    pred = SegGPTPredictor(tiny_model)
    train = examples[0][:5]

    def one_shot(i):  # example i as the prompt, the others (at most 3 judges) as queries
        others = [ex for j, ex in enumerate(train) if j != i][:3]
        outs = pred.predict_batch([img for img, _ in others], [train[i]], num_labels=2)
        return np.mean([mean_iou(o.label_map, lab, 2) for o, (_, lab) in zip(outs, others)])

    chosen = choose_init(pred, train, 2, candidates=4, judges=3)
    scores = [one_shot(i) for i in range(4)]
    assert chosen in range(4) and scores[chosen] == max(scores)
    assert choose_init(pred, train[:1], 2) == 0
    with pytest.raises(ValueError, match="at least one example"):
        choose_init(pred, [], 2)


def test_tuning_is_seed_deterministic_with_augmentation(tiny_model, examples):
    train, init = examples
    cfg = TuningConfig(steps=5, augment=True, seed=3)
    a = PromptTuner(tiny_model, cfg).tune(train, init)
    b = PromptTuner(tiny_model, cfg).tune(train, init)
    c = PromptTuner(tiny_model, TuningConfig(steps=5, augment=True, seed=4)).tune(train, init)
    assert a.losses == b.losses and torch.equal(a.prompt.image, b.prompt.image)
    assert a.losses != c.losses


def test_stop_early_and_bf16(tiny_model, examples):
    train, init = examples
    res = PromptTuner(tiny_model, TuningConfig(steps=50, bf16=True)).tune(train, init,
                                                                         on_step=lambda s, loss: s < 2)
    assert not res.completed and len(res.losses) == 3 and np.isfinite(res.losses).all()


def test_tuned_prompt_round_trip_and_use(tiny_model, examples):
    train, init = examples
    res = PromptTuner(tiny_model, TuningConfig(steps=2)).tune(train, init)
    back = TunedPrompt.from_bytes(res.prompt.to_bytes(), image_size=64)
    assert torch.equal(back.image, res.prompt.image) and back.num_labels == res.prompt.num_labels
    pred = SegGPTPredictor(tiny_model)
    alone = pred.predict(train[1][0], tuned=back)
    mixed = pred.predict(train[1][0], [init], tuned=back)
    assert alone.label_map.shape == train[1][1].shape and mixed.scores.shape[0] == back.num_labels + 1


@pytest.mark.parametrize("data,match", [
    (b"garbage", "not a tuned prompt"),
])
def test_bad_tuned_prompt_bytes(data, match):
    with pytest.raises(ValueError, match=match):
        TunedPrompt.from_bytes(data, 64)


def test_tuned_prompt_of_the_wrong_shape(tiny_model):
    wrong = TunedPrompt(torch.zeros(3, 32, 32), torch.zeros(3, 32, 32), 1)
    with pytest.raises(ValueError, match=r"\(3, 64, 64\)"):
        TunedPrompt.from_bytes(wrong.to_bytes(), 64)
    with pytest.raises(ValueError, match="this model needs"):
        SegGPTPredictor(tiny_model).predict(np.zeros((8, 8, 3), np.uint8), tuned=wrong)


def test_mean_iou():
    t = np.zeros((4, 4), int)
    t[:2] = 1
    assert mean_iou(t, t, 1) == 1.0
    assert mean_iou(np.zeros_like(t), t, 1) == 0.0
    assert mean_iou(np.zeros_like(t), np.zeros_like(t), 2) == 1.0
    half = np.zeros_like(t)
    half[:1] = 1
    assert mean_iou(half, t, 1) == 0.5


def test_retrieval_prefers_similar_images():
    eps = [make_episode(i, size=64) for i in range(5)]
    bank = np.stack([embed_image(e.prompt_image) for e in eps])
    assert np.allclose(np.linalg.norm(bank, axis=1), 1, atol=1e-5)
    for i, e in enumerate(eps):
        assert most_similar(embed_image(e.prompt_image), bank, 2)[0] == i
    with pytest.raises(ValueError, match="do not match"):
        most_similar(np.zeros(3, np.float32), bank, 1)
