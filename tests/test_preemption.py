"""Preemption-safe stop (docs/preemption.md) of a two-phase plan: a notice to the ranks or the launcher,
during a step, an evaluation, a save or at the phase boundary, stops every rank at the same step after
one complete checkpoint; the relaunch of the same command ends bitwise equal to the uninterrupted run; a
kill during that save keeps the previous checkpoint; the exit code that reaches the shell;
max_wall_minutes; the SLURM job script.

Signals go to real processes, so every interrupted run is a real deepspeed launch (``Background``);
the uninterrupted reference and the relaunches are ordinary runs on the rank pool.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, Background, launch, run_config, train, write_config
from helpers_preemption import (
    curve,
    has_record,
    node_launcher,
    preempted,
    records,
    signal_ranks,
    wait_until_gone,
)

STEPS = 10
# Evaluations every 4 steps (the phase boundary among them) over 120 samples one at a time (~0.5 s here):
# long enough to signal inside one.
# Saves every 4 steps, each held open 1.5 s (save_fault_delay_seconds) to signal inside one.
SAVE_DELAY = 1.5


def preempt_config(assets, out: Path, **overrides) -> dict:
    """A two-phase plan meeting at step 4 (a save step): stable on one corpus, then an anneal (WSD,
    1-sqrt decay) on a blend that continues that corpus and adds another."""
    stable = {"name": "stable", "steps": 4, "data_path": [str(assets.corpus)]}
    anneal = {"name": "anneal", "steps": STEPS - 4,
              "data_path": ["0.5", str(assets.corpus), "0.5", str(assets.corpus_b)]}
    config = run_config(assets, out, max_steps=STEPS, eval_steps=4, save_steps=4, max_eval_samples=120,
                        per_device_eval_batch_size=1, save_fault_delay_seconds=SAVE_DELAY,
                        config_overrides="attention_dropout=0.1", phases=[stable, anneal], lr_scheduler_type="wsd",
                        decay_steps=STEPS - 4, decay_type="1-sqrt", **overrides)
    del config["data_path"]
    return config


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    from cpt_ds.export import trained_state_dict

    return trained_state_dict(output_dir / f"step-{STEPS:08d}", exclude_frozen=False)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("preempt_reference")
    train(preempt_config(assets, work / "out"), workdir=work).check()
    return work / "out"


def start(assets, tmp_path: Path) -> tuple[Background, Path, Path]:
    out = tmp_path / "out"
    path = write_config(preempt_config(assets, out), tmp_path / "run.json")
    return Background(["--config", str(path)], workdir=tmp_path), out, path


def relaunch_equals_reference(path: Path, out: Path, tmp_path: Path, reference: Path, *, resumed_at: int) -> None:
    """The same command again: resumes at ``resumed_at`` and ends bitwise equal to the uninterrupted run."""
    again = launch(["--config", str(path)], workdir=tmp_path).check()
    assert f"resuming from {out / f'step-{resumed_at:08d}'}" in again.output
    assert curve(out) == curve(reference)
    ours, theirs = final_weights(out), final_weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)


def assert_stopped_at(out: Path, log: str, step: int, reason: str) -> dict:
    """One preemption record at ``step``, its checkpoint complete and ``latest``, the line in the log."""
    (record,) = preempted(out)
    assert record["step"] == step and record["reason"] == reason, record
    assert (out / f"step-{step:08d}" / "cpt_ds_complete.json").is_file()
    assert (out / "latest").read_text() == f"step-{step:08d}"
    assert f"preempted at step {step} of {STEPS} ({reason}): checkpoint step-{step:08d} is complete" in log
    assert not has_record(out, step + 1, "loss")
    return record


def test_sigusr1_to_the_ranks_during_an_evaluation_at_the_phase_boundary(assets, tmp_path, reference):
    """SIGUSR1 while step 4, the last of the first phase, evaluates: every rank stops there; rank exit code
    3 reaches the shell through launch.py and the runner; the same command trains the second phase,
    bitwise equal to the uninterrupted plan; signal-to-exit measured."""
    job, out, path = start(assets, tmp_path)
    job.wait_for(lambda: has_record(out, 4, "loss"), timeout=300)
    assert not has_record(out, 4, "eval_loss")  # the evaluation of step 4 is running
    sent = time.monotonic()
    signal_ranks(job, signal.SIGUSR1)
    code = job.wait(timeout=120)
    seconds = time.monotonic() - sent
    log = job.log.read_text()
    assert code == 3, log[-3000:]
    record = assert_stopped_at(out, log, 4, "SIGUSR1")
    assert has_record(out, 4, "eval_loss")  # the evaluation finished, then every rank stopped
    assert record["notices"] == 1 and 0 < record["notice_to_saved_seconds"] < seconds
    assert [r["phase"] for r in records(out) if "loss" in r] == ["stable"] * 4
    print(f"\nSIGUSR1 during an evaluation -> launcher exit: {seconds:.2f} s; record {record}")
    relaunch_equals_reference(path, out, tmp_path, reference, resumed_at=4)
    assert [r["phase"] for r in records(out) if "loss" in r] == ["stable"] * 4 + ["anneal"] * (STEPS - 4)


def test_sigterm_to_the_launcher_process_group_at_a_step(assets, tmp_path, reference):
    """The runner dies of SIGTERM at once (-15 to the shell); launch.py forwards it; the ranks still save."""
    job, out, path = start(assets, tmp_path)
    job.wait_for(lambda: has_record(out, 3, "loss"), timeout=300)
    sent = time.monotonic()
    os.killpg(job.process.pid, signal.SIGTERM)
    assert job.wait(timeout=60) == -signal.SIGTERM
    wait_until_gone(job.process.pid)
    seconds = time.monotonic() - sent
    log = job.log.read_text()
    (record,) = preempted(out)
    assert 3 <= record["step"] < STEPS
    assert_stopped_at(out, log, record["step"], "SIGTERM")
    print(f"\nSIGTERM to the launcher's group -> last rank gone: {seconds:.2f} s; record {record}")
    relaunch_equals_reference(path, out, tmp_path, reference, resumed_at=record["step"])


def test_sigterm_to_the_node_launcher_during_a_save(assets, tmp_path, reference):
    """launch.py sends SIGTERM to rank 0 only (rank 1 after rank 0 exits): the agreement stops rank 1 at
    the same step; the save in progress completes and is not repeated; launch.py's own exit code 1."""
    job, out, path = start(assets, tmp_path)
    job.wait_for(lambda: f"before completing {out / 'step-00000004'}" in job.log.read_text(), timeout=300)
    node_launcher(job).send_signal(signal.SIGTERM)
    code = job.wait(timeout=120)
    log = job.log.read_text()
    assert code == 1, log[-3000:]
    assert_stopped_at(out, log, 4, "SIGTERM")
    assert f"checkpoint {out / 'step-00000004'} is already complete; not saving it again" in log
    relaunch_equals_reference(path, out, tmp_path, reference, resumed_at=4)


def test_a_second_signal_and_a_kill_during_the_stop_save_keep_the_previous_checkpoint(assets, tmp_path, reference):
    job, out, path = start(assets, tmp_path)
    job.wait_for(lambda: has_record(out, 5, "loss"), timeout=300)
    signal_ranks(job, signal.SIGUSR1)
    job.wait_for(lambda: "save_fault_delay_seconds: sleeping" in job.log.read_text().split("step-00000004")[-1])
    stopping = [int(line.rsplit("step-", 1)[1][:8]) for line in job.log.read_text().splitlines()
                if "before completing" in line][-1]
    assert stopping > 4
    alive = signal_ranks(job, signal.SIGTERM)  # a second notice during the stop save changes nothing
    time.sleep(0.3)
    assert all(process.is_running() and process.status() != "zombie" for process in alive)
    job.kill()  # what the launcher does when its grace is over
    assert (out / "latest").read_text() == "step-00000004"
    assert not (out / f"step-{stopping:08d}" / "cpt_ds_complete.json").exists()
    assert preempted(out) == []  # the record is written only once the checkpoint is complete
    relaunch_equals_reference(path, out, tmp_path, reference, resumed_at=4)


def test_max_wall_minutes_stops_with_a_checkpoint_before_the_budget_ends(assets, tmp_path):
    # 45 s from each rank's start: a launch's set-up takes about 5 s on an idle 2-core AVX-512 machine,
    # about 15 s expected on AVX2 and more beside the suite's other worker; a set-up past the budget still
    # trains one step, and fails below. Every step saves, each save held open 0.5 s: the run spends its
    # budget mostly asleep, leaving the cores to the other worker, and the stop must keep back a save.
    budget = 0.75
    out = tmp_path / "out"
    done = train(run_config(assets, out, max_steps=100_000, max_wall_minutes=budget, logging_steps=50, save_steps=1,
                            save_total_limit=2, save_fault_delay_seconds=0.5),
                 workdir=tmp_path, launcher=True)
    assert done.returncode == 3, done.output[-3000:]
    (record,) = preempted(out)
    step = record["step"]
    assert record["reason"] == "max_wall_minutes" and 0 < step < 100_000
    assert record["seconds_since_start"] < 60 * budget
    assert (out / "latest").read_text() == f"step-{step:08d}"
    assert (out / f"step-{step:08d}" / "cpt_ds_complete.json").is_file()
    assert f"preempted at step {step} of 100000 (max_wall_minutes)" in done.output
    assert records(out)[-1] == record


# --------------------------------------------------------------------------------------------------
# Without ranks: the wall-clock rule, the config field, the job script
# --------------------------------------------------------------------------------------------------


def test_wall_clock_rule_keeps_back_one_step_and_the_last_save():
    from cpt_ds.preemption import Stopper

    durations: list[float] = []
    stopper = Stopper(1.0, save_durations=durations, rank=0)
    stopper.started = time.monotonic() - 59.0  # as if the rank started 59 s ago: 1 s of the budget left
    assert not stopper.agreed()  # never before this launch's first step
    assert stopper.agreed() and stopper.reason == "max_wall_minutes"  # no save yet: 6 s (10%) kept back
    stopper = Stopper(1.0, save_durations=durations, rank=0)
    stopper.started = time.monotonic() - 59.0
    assert not stopper.agreed()
    time.sleep(0.1)
    durations.append(0.1)  # a save of 0.1 s between the checks: reserved as the save, not counted as step time
    time.sleep(0.02)
    assert not stopper.agreed() and 0.015 <= stopper.longest_step < 0.08  # 59 + 0.02 + 0.1 < 60
    stopper.started -= 0.9
    assert stopper.agreed() and stopper.reason == "max_wall_minutes"  # 59.9 + 0.02 + 0.1 >= 60
    assert Stopper(None, save_durations=[], rank=0).agreed() is False


def test_max_wall_minutes_must_be_positive():
    from cpt_ds.config import TrainConfig

    assert TrainConfig(max_wall_minutes=0).problems() == ["max_wall_minutes must be positive or null, got 0"]
    assert TrainConfig(max_wall_minutes=0.5).problems() == []


SBATCH = REPO / "tools" / "slurm" / "cpt.sbatch"
STUBS = {
    "scontrol": """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a\\ngpu-b\\n'; exit 0; fi
echo "$*" >> "$STUB_LOG/scontrol"
""",
    "scancel": """#!/bin/bash
echo "$*" >> "$STUB_LOG/scancel"
touch "$STUB_LOG/notice"
""",
    # srun: records its arguments, optionally waits for the forwarded notice, exits with STUB_CODE.
    "srun": """#!/bin/bash
printf '%s\\0' "$@" > "$STUB_LOG/srun"
for arg in "$@"; do case "$arg" in *.cpt_ds_hostfile.*) cp "$arg" "$STUB_LOG/hostfile";; esac; done
if [ -n "${STUB_WAIT:-}" ]; then
    touch "$STUB_LOG/started"
    while [ ! -e "$STUB_LOG/notice" ]; do sleep 0.05; done
fi
exit "$STUB_CODE"
""",
}


def run_sbatch(tmp_path: Path, code: int, *, notice: bool = False) -> tuple[subprocess.CompletedProcess, Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "STUB_CODE": str(code),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_SUBMIT_DIR": str(tmp_path),
           "CPT_DS_PYTHON": sys.executable, "CPT_DS_GPUS_PER_NODE": "4", "CPT_DS_REPO": str(REPO)}
    if notice:
        env["STUB_WAIT"] = "1"
    process = subprocess.Popen(["bash", str(SBATCH), "run.json", "--seed", "3"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if notice:
        deadline = time.monotonic() + 30
        while not (log / "started").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1: to the batch shell only
    output, _ = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, output), log


def test_sbatch_script_parses():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    text = SBATCH.read_text()
    assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text


@pytest.mark.parametrize("code", [0, 1, 2, 3])
def test_sbatch_requeues_only_a_preempted_run(tmp_path, code):
    done, log = run_sbatch(tmp_path, code)
    assert done.returncode == code, done.stdout
    requeued = (log / "scontrol").read_text() if (log / "scontrol").exists() else ""
    assert requeued == ("requeue 4242\n" if code == 3 else ""), done.stdout
    srun = (log / "srun").read_text().split("\0")[:-1]
    task = srun[srun.index("-c") + 1]
    assert 'trap "" USR1 TERM' in task and "--no_ssh --node_rank \"$SLURM_NODEID\"" in task
    assert srun[srun.index("-c") + 2:] == [sys.executable, str(tmp_path / ".cpt_ds_hostfile.4242"), "gpu-a", "29500",
                                           str(REPO), "run.json", "--seed", "3"]
    assert (log / "hostfile").read_text() == "gpu-a slots=4\ngpu-b slots=4\n"
    assert not (tmp_path / ".cpt_ds_hostfile.4242").exists()  # removed after the run


def test_sbatch_forwards_the_notice_to_the_ranks_and_requeues(tmp_path):
    done, log = run_sbatch(tmp_path, 3, notice=True)
    assert done.returncode == 3, done.stdout
    assert (log / "scancel").read_text() == "--signal=USR1 4242\n"
    assert (log / "scontrol").read_text() == "requeue 4242\n"
    assert "USR1 received; forwarding SIGUSR1 to the ranks of job 4242" in done.stdout
