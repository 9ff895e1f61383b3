"""cpt-ds training entry point.

    deepspeed --hostfile hostfiles/localhost --no_ssh --node_rank 0 --master_addr 127.0.0.1 \
        train.py --config RUN.json [--field value ...]

Parse the run config, build the trainer, train, close. Everything else lives in cpt_ds/.
"""

import os
import sys

from cpt_ds.checkpoint import CheckpointError
from cpt_ds.config import ConfigError, RunConfig
from cpt_ds.data import DataError
from cpt_ds.distributed import exit_process
from cpt_ds.token_file import TokenFileError
from cpt_ds.trainer import DivergedError, Trainer

USER_ERRORS = (ConfigError, CheckpointError, DataError, TokenFileError)


def main(argv: list[str] | None = None) -> int:
    try:
        config = RunConfig.load(argv)
        trainer = Trainer(config)
    except USER_ERRORS as error:
        report(error)
        return 2
    try:
        trainer.train()
    except DivergedError as error:
        report(error)
        return 1
    finally:
        trainer.close()
    return 0


def report(error: Exception) -> None:
    # Every rank reaches the same verdict; a traceback would only bury the one sentence that matters.
    print(f"error (rank {os.environ.get('RANK', '0')}): {error}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    exit_process(main())
