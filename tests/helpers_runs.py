"""Run helpers shared by several test modules (test modules never import each other)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import metrics, train


def change_world_size(make_config, assets, tmp_path: Path, *, launcher: bool = False, **base) -> tuple[Path, Path, str]:
    """A reference run on 2 ranks x 2 micro-batches, and the same run stopped at step 4 and continued
    on 1 rank x 4 micro-batches (the same global batch), in a fresh deepspeed launch with ``launcher``;
    ``(reference, resumed, resumed launch output)``."""
    work_a, work_b = tmp_path / "a", tmp_path / "b"
    reference, out = work_a / "out", work_b / "out"
    train(make_config(assets, reference, **base), workdir=work_a).check()
    train(make_config(assets, out, stop_at_step=4, **base), workdir=work_b).check()
    resumed = train(make_config(assets, out, gradient_accumulation_steps=4, **base), workdir=work_b, ranks=1,
                    launcher=launcher).check()
    assert "saved by 2 ranks, this run has 1: loading it through DeepSpeed's universal checkpoint" in resumed.output
    assert "resumed at step 4, consumed_samples 32" in resumed.output
    return reference, out, resumed.output


def assert_same_curve_to_float_rounding(resumed: Path, reference: Path) -> None:
    """Same weights, optimizer state and samples, so the same curve up to the order of the float sums
    (fp32 over 1 rank vs 2: ~1e-8). Under ZeRO-3 this pins the two repairs after DeepSpeed's universal
    load (group hyperparameters, Adam's shared step): without them, 1e-5 at the next step, 1e-3 by the end."""
    for a, b in zip(metrics(resumed), metrics(reference), strict=True):
        key = "loss" if "loss" in a else "eval_loss"
        assert a["step"] == b["step"] and a[key] == pytest.approx(b[key], rel=1e-6, abs=0)
