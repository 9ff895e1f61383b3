"""A checkpoint written by the code before the house refactor (tests/assets/pre_house_run/README.md) keeps
resuming: the data position continues exactly and the losses are the old uninterrupted run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import launch, metrics

OLD_RUN = Path(__file__).parent / "assets" / "pre_house_run"


def test_a_pre_house_checkpoint_resumes_to_the_old_runs_curve(tmp_path):
    copy = tmp_path / "pre_house_run"
    shutil.copytree(OLD_RUN, copy)
    result = launch(["--config", "run.json"], workdir=tmp_path / "work", cwd=copy).check()
    assert "resumed at step 3" in result.output and "from run/step-00000003" in result.output, result.output[-3000:]

    old = [json.loads(line) for line in (OLD_RUN / "uninterrupted_metrics.jsonl").read_text().splitlines()]
    new = metrics(copy / "run")
    old_train = [r for r in old if "loss" in r and r["step"] > 3]
    new_train = [r for r in new if "loss" in r]
    assert [r["step"] for r in new_train] == [4, 5, 6]
    # The data position is integer bookkeeping: exact.
    assert [r["consumed_samples"] for r in new_train] == [r["consumed_samples"] for r in old_train]
    # Not bitwise: the fixture was made on an AVX-512 CPU, CI may run AVX2 kernels.
    for ours, theirs in zip(new_train, old_train, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert ours["lr"] == pytest.approx(theirs["lr"], rel=1e-5)
        for name, corpus in theirs["corpora"].items():
            assert ours["corpora"][name]["loss"] == pytest.approx(corpus["loss"], rel=1e-5)
    old_evals = [r for r in old if "eval_loss" in r and r["step"] > 3]
    new_evals = [r for r in new if "eval_loss" in r]
    assert [r["step"] for r in new_evals] == [r["step"] for r in old_evals] == [4, 6]
    for ours, theirs in zip(new_evals, old_evals, strict=True):
        assert ours["eval_tokens"] == theirs["eval_tokens"]
        assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-5)
        for name, scores in theirs["sets"].items():
            assert ours["sets"][name]["eval_loss"] == pytest.approx(scores["eval_loss"], rel=1e-5)
