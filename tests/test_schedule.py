"""The warmup-stable-decay (wsd) schedule: every step equals transformers' ``get_wsd_schedule``, and
its config fields are checked together with the rest of the run config."""

from __future__ import annotations

import pytest
import torch

from cpt_ds.config import ConfigError, OptimConfig, RunConfig
from cpt_ds.optim import lr_at, warmup_steps_for

from conftest import metrics, run_config, train

# (max_steps, warmup, decay, min_lr_ratio, the warmup and decay steps they mean): warmup and decay as
# steps (int) or ratios (float, rounded up).
SETTINGS = [
    (100, 10, 20, 0.0, 10, 20),
    (100, 0.05, 0.2, 0.1, 5, 20),
    (37, 3, 0.3, 0.05, 3, 12),  # 0.3 x 37 = 11.1 rounds up to 12 decay steps
    (50, 0, 50, 0.0, 0, 50),  # no warmup (warmup_ratio 0), no stable phase: decay from the first step
    (20, 5, 15, 0.2, 5, 15),  # no stable phase after warmup
    (9, 1, 1, 0.0, 1, 1),  # a one-step decay
    (100, 0.1, 0.07, 0.0, 10, 7),  # 0.07 x 100 is 7.000000000000001 in floats: still 7 decay steps
]

def optim_config(warmup, decay, min_lr_ratio: float, decay_type: str) -> OptimConfig:
    warmup_fields = {"warmup_steps": warmup} if isinstance(warmup, int) and warmup > 0 else \
        {"warmup_ratio": float(warmup), "warmup_steps": 0}
    decay_fields = {"decay_steps": decay} if isinstance(decay, int) else {"decay_ratio": decay}
    return OptimConfig(learning_rate=3e-3, lr_scheduler_type="wsd", min_lr_ratio=min_lr_ratio,
                       decay_type=decay_type, **warmup_fields, **decay_fields)


def transformers_lrs(*, max_steps: int, num_warmup_steps: int, num_decay_steps: int, decay_type: str,
                     min_lr_ratio: float, learning_rate: float = 3e-3) -> list[float]:
    """The LR of optimizer steps 1..max_steps in a plain torch loop driven by ``get_wsd_schedule``."""
    from transformers.optimization import get_wsd_schedule

    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=learning_rate)
    scheduler = get_wsd_schedule(optimizer, num_warmup_steps=num_warmup_steps, num_decay_steps=num_decay_steps,
                                 num_training_steps=max_steps, decay_type=decay_type, min_lr_ratio=min_lr_ratio)
    used = []
    for _ in range(max_steps):
        weight.grad = torch.ones(2)
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


@pytest.mark.parametrize("decay_type", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("max_steps,warmup,decay,min_lr_ratio,num_warmup,num_decay", SETTINGS)
def test_every_step_equals_transformers_get_wsd_schedule(max_steps, warmup, decay, min_lr_ratio, num_warmup,
                                                         num_decay, decay_type):
    config = optim_config(warmup, decay, min_lr_ratio, decay_type)
    # transformers gets the step counts the settings mean, written out above, not read back from our code.
    assert (warmup_steps_for(config, max_steps), config.num_decay_steps(max_steps)) == (num_warmup, num_decay)
    expected = transformers_lrs(max_steps=max_steps, num_warmup_steps=num_warmup, num_decay_steps=num_decay,
                                decay_type=decay_type, min_lr_ratio=min_lr_ratio)
    # Step record k (1-based) carries lr_at(k - 1): the trainer asks for the LR of the step it is about to take.
    ours = [lr_at(k - 1, config, total_steps=max_steps, warmup_steps=num_warmup) for k in range(1, max_steps + 1)]
    assert ours == pytest.approx(expected, rel=1e-9, abs=0)
    stable_end = max_steps - num_decay
    assert ours[num_warmup:stable_end] == [3e-3] * (stable_end - num_warmup)  # the stable phase holds the peak
    assert ours[-1] > 3e-3 * min_lr_ratio  # transformers' decay ends one step above its floor


def test_the_decay_shapes_differ_as_named():
    """Halfway through a 100-step decay: linear at 1/2, cosine at 1/2, 1-sqrt at 1 - sqrt(1/2)."""
    def midway(decay_type: str) -> float:
        config = optim_config(0, 100, 0.0, decay_type)
        return lr_at(50, config, total_steps=100, warmup_steps=0) / 3e-3

    assert midway("linear") == pytest.approx(0.5)
    assert midway("cosine") == pytest.approx(0.5)
    assert midway("1-sqrt") == pytest.approx(1 - 0.5 ** 0.5)
    assert OptimConfig().decay_type == "1-sqrt"


# ---- config errors -------------------------------------------------------------------------------

BASE = {"config_name": "model", "tokenizer_name_or_path": "tok", "full_finetuning": True, "data_path": ["d"],
        "max_steps": 100}


def problems(**fields) -> list[str]:
    return RunConfig.from_flat({**BASE, **fields}).config_problems()


def test_a_good_wsd_config_has_no_problems():
    assert problems() == []
    assert problems(lr_scheduler_type="wsd", decay_ratio=0.2, decay_type="linear", warmup_steps=80) == []
    assert problems(lr_scheduler_type="wsd", decay_steps=90, warmup_ratio=0.1) == []  # 10 + 90 = 100


@pytest.mark.parametrize("fields,expected", [
    ({}, "lr_scheduler_type wsd needs the length of its final decay: set decay_steps or decay_ratio"),
    ({"decay_steps": 20, "decay_ratio": 0.2},
     "decay_steps (20) and decay_ratio (0.2) both set the wsd decay: keep one"),
    ({"decay_steps": 0}, "decay_steps must be positive, got 0"),
    ({"decay_ratio": 1.5}, "decay_ratio must be in (0, 1], got 1.5"),
    ({"decay_steps": 95, "warmup_steps": 10},
     "the wsd decay (decay_steps 95 = 95 steps) is longer than the 90 steps that 10 warmup steps leave of 100: "
     "shorten decay_steps or the warmup"),
    ({"decay_ratio": 0.96, "warmup_ratio": 0.05},
     "the wsd decay (decay_ratio 0.96 = 96 steps) is longer than the 95 steps that 5 warmup steps leave of 100: "
     "shorten decay_ratio or the warmup"),
])
def test_wsd_decay_problems_are_named(fields, expected):
    assert problems(lr_scheduler_type="wsd", **fields) == [expected]


@pytest.mark.parametrize("fields,expected", [
    ({"decay_steps": 20}, "decay_steps (20) sets the decay of lr_scheduler_type wsd, not cosine: drop it or set "
                          "lr_scheduler_type wsd"),
    ({"decay_ratio": 0.2}, "decay_ratio (0.2) sets the decay of lr_scheduler_type wsd, not cosine: drop it or set "
                           "lr_scheduler_type wsd"),
    ({"decay_type": "1-sqrt"}, "decay_type (1-sqrt) shapes the decay of lr_scheduler_type wsd, not cosine: drop it "
                               "or set lr_scheduler_type wsd"),
])
def test_decay_fields_with_another_schedule_are_refused(fields, expected):
    assert problems(**fields) == [expected]


def test_all_wsd_problems_come_in_one_error_and_an_unknown_decay_type_is_named():
    config = RunConfig.from_flat({**BASE, "lr_scheduler_type": "linear", "decay_steps": 5, "decay_ratio": 0.1})
    assert config.config_problems() == [
        "decay_steps (5) sets the decay of lr_scheduler_type wsd, not linear: drop it or set lr_scheduler_type wsd",
        "decay_ratio (0.1) sets the decay of lr_scheduler_type wsd, not linear: drop it or set lr_scheduler_type wsd"]
    with pytest.raises(ConfigError) as error:
        RunConfig.from_flat({**BASE, "lr_scheduler_type": "wsd", "decay_steps": 5, "decay_type": "exponential"})
    assert str(error.value) == ("invalid run configuration (config): decay_type: must be one of "
                                "['linear', 'cosine', '1-sqrt'], got 'exponential'")


# ---- a run ---------------------------------------------------------------------------------------


def test_a_wsd_run_logs_the_transformers_lr_at_every_step(assets, tmp_path):
    """2 ranks, 8 steps: 2 warmup, 3 stable, 3 decay (1-sqrt, floor 0.1); then a run whose length comes
    from num_train_epochs with a decay longer than the run is refused once the length is known."""
    config = run_config(assets, tmp_path / "out", max_steps=8, warmup_steps=2, lr_scheduler_type="wsd",
                        decay_steps=3, min_lr_ratio=0.1, validation_split_percentage=0.0, max_eval_samples=None)
    train(config, workdir=tmp_path).check()
    records = [r for r in metrics(tmp_path / "out") if "loss" in r]
    expected = transformers_lrs(max_steps=8, num_warmup_steps=2, num_decay_steps=3, decay_type="1-sqrt",
                                min_lr_ratio=0.1)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-9, abs=0)

    by_epochs = run_config(assets, tmp_path / "epochs", max_steps=-1, num_train_epochs=1.0, lr_scheduler_type="wsd",
                           decay_steps=100000, validation_split_percentage=0.0, max_eval_samples=None)
    refused = train(by_epochs, workdir=tmp_path)
    assert refused.returncode == 2, refused.output[-3000:]
    assert "the wsd decay (decay_steps 100000 = 100000 steps) is longer than the" in refused.output
    assert "Traceback" not in refused.output
