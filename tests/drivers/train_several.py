"""Test driver: train several run configs one after another in one launch (one process group).

    deepspeed ... tests/drivers/train_several.py RUN_A.json RUN_B.json ...

Each config is trained like train.py does; only the process group is shared, so a test comparing
runs that differ in data alone pays the launcher's and the ranks' start-up once instead of per run.
"""

import sys

from cpt_ds.config import RunConfig
from cpt_ds.distributed import barrier, exit_process
from cpt_ds.trainer import Trainer


def main() -> int:
    configs = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]  # the launcher adds it
    for index, path in enumerate(configs):
        trainer = Trainer(RunConfig.load(["--config", path]))
        trainer.train()
        if index + 1 < len(configs):
            barrier()
            trainer.engine.destroy()
        else:
            trainer.close()
    return 0


if __name__ == "__main__":
    exit_process(main())
