"""The rank pool that runs the suite's distributed jobs (tests/helpers_pool.py) behaves like a fresh
launch where a test can tell: exit codes, output, environment, folder, once-per-process warnings, and a
rank that fails or dies while the other waits."""

from __future__ import annotations

import re

from conftest import DRIVERS, REPO, launch, launch_env, launcher_command, rank_pool
from helpers_pool import RankPool

PROBE = DRIVERS / "pool_probe.py"


def test_each_job_sees_its_own_environment_and_folder_and_warnings(tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_DS_POOL_PROBE", "first")
    first = launch(["report"], workdir=tmp_path, script=PROBE, cwd=tmp_path).check()
    monkeypatch.setenv("CPT_DS_POOL_PROBE", "second")
    second = launch(["report"], workdir=tmp_path, script=PROBE, cwd=REPO).check()
    for rank in (0, 1):
        assert f"rank {rank}: probe=first leftover=- cwd={tmp_path}\n" in first.output, first.output
        assert f"rank {rank}: probe=second leftover=- cwd={REPO}\n" in second.output, second.output
    shown = "UserWarning: pool probe warning"
    assert first.output.count(shown) == second.output.count(shown) == 2


def test_the_launcher_and_the_pool_give_the_same_report(tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_DS_POOL_PROBE", "same")
    pooled = launch(["report"], workdir=tmp_path / "pool", script=PROBE, cwd=tmp_path).check()
    fresh = launch(["report"], workdir=tmp_path / "fresh", script=PROBE, cwd=tmp_path, launcher=True).check()

    def reports(output: str) -> list[str]:
        return sorted(re.findall(r"^rank \d: .*$", output, re.M))

    assert reports(pooled.output) == reports(fresh.output) != []


def test_a_failed_rank_ends_the_job_with_its_code_and_a_fresh_pool_takes_the_next(tmp_path):
    pool = RankPool(2, launcher_command, launch_env, failed_rank_grace=2.0)
    try:
        code, output = pool.run(PROBE, ["fail-rank-1"], cwd=REPO, env=launch_env(), workdir=tmp_path, timeout=120)
        assert code == 3 and "rank 1 fails" in output
        # Rank 0 stayed in its barrier: that pool is gone, a fresh one runs the next job (and rank 1's
        # death in it is the launcher's verdict: not 0).
        code, output = pool.run(PROBE, ["crash-rank-1"], cwd=REPO, env=launch_env(), workdir=tmp_path, timeout=120)
        assert code != 0 and pool.num_starts == 2
    finally:
        pool.shutdown()


def test_the_session_pool_is_reused(tmp_path):
    pool = rank_pool(2)
    launch(["report"], workdir=tmp_path, script=PROBE).check()
    starts = pool.num_starts
    launch(["report"], workdir=tmp_path, script=PROBE).check()
    assert pool.num_starts == starts >= 1
