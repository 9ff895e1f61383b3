"""cpt-ds training entry point.

    deepspeed --hostfile hostfiles/localhost --no_ssh --node_rank 0 --master_addr 127.0.0.1 \
        train.py --config RUN.json [--field value ...] [--debug]

Parse the run config, build the trainer, train, close. Everything else lives in cpt_ds/. A user error
is one line per rank and exit 2 (``--debug`` or CPT_DS_DEBUG=1: with its traceback); divergence exits 1;
a preemption notice (SIGTERM, SIGUSR1) or the end of max_wall_minutes saves and exits 3 (docs/preemption.md).
"""

import os

from cpt_ds.checkpoint import CheckpointError
from cpt_ds.cli import debug_in_argv, report_user_error
from cpt_ds.config import ConfigError, RunConfig
from cpt_ds.data import DataError
from cpt_ds.distributed import exit_process
from cpt_ds.preemption import PREEMPTED_EXIT_CODE, Preempted, install_handlers
from cpt_ds.token_file import TokenFileError
from cpt_ds.trainer import DivergedError, Trainer

USER_ERRORS = (ConfigError, CheckpointError, DataError, TokenFileError)


def main(argv: list[str] | None = None) -> int:
    install_handlers()  # before anything slow: a notice during set-up is recorded, not fatal
    debug = debug_in_argv(argv)
    try:
        config = RunConfig.load(argv)
        trainer = Trainer(config)
    except USER_ERRORS as error:
        report(error, debug)
        return 2
    try:
        trainer.train()
    except Preempted:  # every rank saved the same step; the relaunch resumes there
        return PREEMPTED_EXIT_CODE
    except DivergedError as error:
        report(error, debug)
        return 1
    except USER_ERRORS as error:  # e.g. a checkpoint found damaged while exporting output_dir/final
        report(error, debug)
        return 2
    finally:
        trainer.close()
    return 0


def report(error: Exception, debug: bool) -> None:
    # Every rank reaches the same verdict; a traceback would only bury the one sentence that matters.
    report_user_error(error, f"error (rank {os.environ.get('RANK', '0')}): ", debug=debug)


if __name__ == "__main__":
    exit_process(main())
