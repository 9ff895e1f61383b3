"""One rank of the test suite's persistent rank pool (tests/helpers_pool.py).

    deepspeed ... tests/drivers/pool_rank.py --connect PORT

Started once through the real deepspeed launcher, it joins the gloo process group once and then runs
job after job in this process: each job is a script (train.py, a tool, a test driver) with its argv,
working folder and environment, run as ``__main__`` exactly as the launcher would run it, with its
stdout and stderr going to the job's own log file. What a fresh process pays per launch (interpreter,
torch/transformers/DeepSpeed imports, DeepSpeed's CPU comm op, gloo set-up: most of a tiny run's time)
is paid once per pool.

Two things differ from a fresh launch, on purpose: the process group outlives the job (a job's
``destroy_process_group`` is a no-op here) and ``exit_process`` ends the job instead of the process.
Both are exercised by the tests that keep the real launcher (kill -9, two nodes, world-size change,
the quick start).
"""

import gc
import os
import runpy
import signal
import sys
import traceback
import warnings
from multiprocessing.connection import Client

import cpt_ds.distributed as distributed

real_exit_process = distributed.exit_process
real_destroy_process_group = distributed.destroy_process_group


class JobExit(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def end_job(code: int):
    raise JobExit(code)


# Patched before any other cpt_ds module is imported, so `from cpt_ds.distributed import ...` in the
# trainer and the drivers binds these.
distributed.exit_process = end_job
distributed.destroy_process_group = lambda: None

PRESERVED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def exit_code(error: SystemExit) -> int:
    if error.code is None:
        return 0
    if isinstance(error.code, int):
        return error.code
    print(error.code, file=sys.stderr)
    return 1


def run_script(script: str, argv: list[str]) -> int:
    # As the launcher runs it: `python -u SCRIPT --local_rank=N ARGS`, the script's folder first on the path.
    sys.argv = [script, f"--local_rank={os.environ['LOCAL_RANK']}", *argv]
    sys.path.insert(0, os.path.dirname(script))
    try:
        runpy.run_path(script, run_name="__main__")
    except JobExit as done:
        return done.code
    except SystemExit as done:
        return exit_code(done)
    except BaseException:  # a bug in the job: the launcher would show its traceback and exit 1
        traceback.print_exc()
        return 1
    finally:
        sys.path.remove(os.path.dirname(script))
    return 0


def clear_once_caches() -> None:
    """Warnings shown once per process must show again in the next job, as in a fresh process."""
    warnings.filters[:] = BASE_WARNING_FILTERS
    warnings.onceregistry.clear()
    warnings._filters_mutated()  # invalidates every module's __warningregistry__
    import logging

    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):  # transformers' lru-cached Logger.warning_once
        once.cache_clear()


def release_globals() -> None:
    """Library state a fresh process would not have: the ZeRO-3 config transformers keeps a weak
    reference to (ZeRO-3 construction in the next job otherwise), DeepSpeed's parallel-state object
    (``deepspeed.initialize(mpu=...)`` of a sequence-parallel job; the next job's engine would read its
    groups), and the cycles holding the engine."""
    gc.collect()
    # What survives a job (modules imported, library caches) is long-lived: frozen, the collector skips
    # it, so a job's collections scan only what that job made. Scanning the whole torch/transformers
    # heap took about 0.2 s per collection, close to half of a tiny job.
    gc.freeze()
    if "transformers.integrations.deepspeed" in sys.modules:
        sys.modules["transformers.integrations.deepspeed"].unset_hf_deepspeed_config()
    if "deepspeed.utils.groups" in sys.modules:
        sys.modules["deepspeed.utils.groups"].mpu = None


def run_job(job: dict, launcher_env: dict[str, str]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = os.dup(1), os.dup(2)
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_handlers = {number: signal.getsignal(number) for number in PRESERVED_SIGNALS}
    log = os.open(job["logs"][int(os.environ["RANK"])], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    try:
        os.environ.clear()
        os.environ.update({**job["env"], **launcher_env})
        os.chdir(job["cwd"])
        clear_once_caches()
        return run_script(job["script"], job["argv"])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        for number, handler in saved_handlers.items():
            signal.signal(number, handler)
        release_globals()


def main() -> int:
    port = int(sys.argv[sys.argv.index("--connect") + 1])
    rank, world_size, _ = distributed.init_distributed()
    # What the launcher set for this rank (RANK, LOCAL_RANK, MASTER_PORT, ...); a job's environment is
    # the test's, plus these.
    connection = Client(("127.0.0.1", port), authkey=os.environ["CPT_DS_POOL_KEY"].encode())
    connection.send({"rank": rank, "world_size": world_size, "pid": os.getpid()})
    hello = connection.recv()
    launcher_env = {key: value for key, value in os.environ.items() if hello["env"].get(key) != value}
    gc.collect()
    gc.freeze()  # the imports and the process group: see release_globals
    while True:
        job = connection.recv()
        if job is None:
            break
        connection.send({"code": run_job(job, launcher_env)})
    connection.close()
    distributed.destroy_process_group = real_destroy_process_group
    return 0


BASE_WARNING_FILTERS = list(warnings.filters)

if __name__ == "__main__":
    real_exit_process(main())
