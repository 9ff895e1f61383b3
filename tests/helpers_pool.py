"""A persistent pool of gloo ranks that runs the suite's distributed jobs (the test side).

Most of a tiny 2-rank launch is start-up: two interpreters, the launcher's own two, torch,
transformers and DeepSpeed imports, DeepSpeed's CPU comm op and the gloo rendezvous. The pool pays
that once: its ranks are started through the real deepspeed launcher (tests/drivers/pool_rank.py),
join the process group once and then run each job's script in-process (DeepSpeed's own unit tests
reuse their distributed environment the same way, ``reuse_dist_env``).

A job reports like a launch: the first non-zero exit code of its ranks (0 if none) and the ranks'
output, rank 0 first. A job whose rank failed while another rank still waits in a collective (the
launcher would kill that rank) ends the pool; the next job starts a fresh one.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import tempfile
import threading
import time
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path

from cpt_ds.distributed import free_port, remove_shm_buffers

POOL_RANK = Path(__file__).parent / "drivers" / "pool_rank.py"
START_TIMEOUT = 300.0
# How long the other ranks may take to reach their own verdict after one rank failed (every rank
# raises the same user error at about the same time; a rank still waiting after this is stuck in a
# collective the failed rank will never join).
FAILED_RANK_GRACE = 60.0


class PoolBroken(RuntimeError):
    pass


class RankPool:
    """``num_ranks`` ranks on this machine, started on first use."""

    def __init__(self, num_ranks: int, command_for, env_for, *, failed_rank_grace: float = FAILED_RANK_GRACE):
        self.num_ranks = num_ranks
        self.failed_rank_grace = failed_rank_grace
        self._command_for = command_for
        self._env_for = env_for
        self._process: subprocess.Popen | None = None
        self._connections: list[Connection] = []
        self._num_jobs = 0
        self.num_starts = 0

    # ---------------------------------------------------------------------------------------------
    def _start(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="cpt_ds_pool_"))
        key = secrets.token_hex(16)
        listener = Listener(("127.0.0.1", 0), authkey=key.encode())
        self.port = free_port()
        env = {**self._env_for(), "CPT_DS_POOL_KEY": key}
        command = self._command_for(POOL_RANK, ["--connect", str(listener.address[1])], ranks=self.num_ranks,
                                    port=self.port, workdir=self.folder)
        self._log = self.folder / "pool.log"
        with open(self._log, "w") as log:
            self._process = subprocess.Popen(command, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        try:
            self._connections = self._accept(listener, env)
        finally:
            listener.close()
        self.num_starts += 1

    def _accept(self, listener: Listener, env: dict[str, str]) -> list[Connection]:
        accepted: list[Connection] = []

        def accept_all() -> None:
            for _ in range(self.num_ranks):
                accepted.append(listener.accept())

        thread = threading.Thread(target=accept_all, daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while thread.is_alive():
            thread.join(0.05)
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.shutdown(force=True)
                raise PoolBroken(f"the rank pool did not start:\n{self._log.read_text()[-4000:]}")
        by_rank: list[Connection | None] = [None] * self.num_ranks
        for connection in accepted:
            by_rank[connection.recv()["rank"]] = connection
        for connection in by_rank:
            connection.send({"env": env})
        return by_rank

    # ---------------------------------------------------------------------------------------------
    def run(self, script: Path, args: list[str], *, cwd: Path, env: dict[str, str], workdir: Path,
            timeout: float) -> tuple[int, str]:
        """Run ``script args`` on every rank; ``(exit code, output)``. Raises TimeoutExpired like a launch."""
        if self._process is None:
            self._start()
        self._num_jobs += 1
        logs = [str(workdir / f"pool_job{self._num_jobs}_rank{rank}.log") for rank in range(self.num_ranks)]
        job = {"script": str(script), "argv": [str(a) for a in args], "cwd": str(cwd), "env": env, "logs": logs}
        for connection in self._connections:
            connection.send(job)
        code = self._collect(timeout)
        output = "".join(Path(log).read_text(errors="replace") if Path(log).exists() else "" for log in logs)
        if code is None:
            raise subprocess.TimeoutExpired(f"pool job {script}", timeout, output=output)
        return code, output

    def _collect(self, timeout: float) -> int | None:
        """The job's exit code as the launcher gives it: the first failing rank's code (0 if none); None
        when the job ran past ``timeout``. Ends the pool when a rank died or stays stuck after another
        rank failed (the launcher kills it)."""
        pending = list(self._connections)
        deadline = time.monotonic() + timeout
        first_failure: int | None = None
        broken = False
        while pending:
            ready = wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self.shutdown(force=True)
                return first_failure
            for connection in ready:
                pending.remove(connection)
                try:
                    code = connection.recv()["code"]
                # The rank process died (a reset instead of an end of file when it left data unread):
                # its launcher ends the others and exits.
                except (EOFError, ConnectionResetError):
                    code, broken = self._died_code(), True
                if code != 0 and first_failure is None:
                    first_failure = code
                    deadline = min(deadline, time.monotonic() + self.failed_rank_grace)
        if broken:
            self.shutdown(force=True)
        return first_failure or 0

    def _died_code(self) -> int:
        try:
            return self._process.wait(timeout=30) or -signal.SIGKILL
        except subprocess.TimeoutExpired:
            return -signal.SIGKILL

    # ---------------------------------------------------------------------------------------------
    def shutdown(self, *, force: bool = False) -> None:
        """End the pool: politely (each rank leaves its loop and exits as a launched process does, so
        coverage data and logs are written), or with SIGKILL to every process of the launch."""
        if self._process is None:
            return
        if not force:
            try:
                for connection in self._connections:
                    connection.send(None)
                self._process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                force = True
        if force:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._process.wait()
        for connection in self._connections:
            connection.close()
        self._connections, self._process = [], None
        remove_shm_buffers(self.port)
