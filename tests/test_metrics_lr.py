"""Shifted-label metrics arithmetic and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from cpt_ds.config import OptimConfig
from cpt_ds.metrics import LOSS_UNITS_PER_NAT, TokenMetrics, batch_stats, loss_from_logits
from cpt_ds.optim import lr_at, warmup_steps_for


def test_batch_stats_score_position_t_against_label_t():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 0, 2] = 10.0  # predicts 2
    logits[0, 1, 1] = 10.0  # predicts 1
    logits[0, 2, 3] = 10.0  # predicts 3, but this label is ignored
    labels = torch.tensor([[2, 3, -100]])
    stats = TokenMetrics.from_tensor(batch_stats(loss_from_logits(logits, labels), labels))
    assert (stats.correct, stats.tokens) == (1, 2)
    expected = (torch.nn.functional.cross_entropy(logits[0, :2], labels[0, :2], reduction="sum")).item()
    assert stats.loss == pytest.approx(expected / 2, abs=2 / LOSS_UNITS_PER_NAT)
    assert stats.perplexity == pytest.approx(math.exp(stats.loss))


def test_fixed_point_sums_do_not_depend_on_how_positions_are_split():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5, 50), torch.randint(0, 50, (6, 5))
    def stats(rows):
        return batch_stats(loss_from_logits(logits[rows], labels[rows]), labels[rows])

    whole = stats(slice(None))
    parts = stats(slice(0, 1)) + stats(slice(1, 4)) + stats(slice(4, None))
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "constant_with_warmup"])
def test_lr_is_a_pure_function_of_the_step(kind):
    config = OptimConfig(learning_rate=1e-3, lr_scheduler_type=kind, warmup_ratio=0.1, min_lr_ratio=0.1)
    total = 100
    warmup = warmup_steps_for(config, total)
    values = [lr_at(step, config, total_steps=total, warmup_steps=warmup) for step in range(total)]
    assert values == [lr_at(step, config, total_steps=total, warmup_steps=warmup) for step in range(total)]
    if kind == "constant":
        assert set(values) == {1e-3}
        return
    assert warmup == 10 and values[0] == pytest.approx(1e-4) and values[9] == pytest.approx(1e-3)
    if kind == "constant_with_warmup":
        assert set(values[9:]) == {1e-3}
    else:
        assert values[-1] == pytest.approx(1e-4) and all(a >= b for a, b in zip(values[9:], values[10:]))
    if kind == "cosine":
        assert values[10 + 45] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))


def test_status_line_durations_and_time_left():
    from cpt_ds.reporter import RECENT_STEPS, eta_seconds, format_duration

    assert [format_duration(s) for s in (0, 4.4, 59.6, 65, 192, 3600, 7389, None, math.inf)] == [
        "0s", "4s", "1m00s", "1m05s", "3m12s", "1h00m00s", "2h03m09s", "-", "-"]
    assert eta_seconds([], 10) is None  # no step measured yet
    assert eta_seconds([1.0, 2.0, 3.0], 0) == 0.0
    assert eta_seconds([1.0, 2.0, 3.0], 10) == pytest.approx(20.0)  # mean 2 s x 10 steps
    assert RECENT_STEPS == 20
