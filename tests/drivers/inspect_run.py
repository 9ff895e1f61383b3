"""Test driver: train like train.py, then report what only the live engine can show.

    deepspeed ... tests/drivers/inspect_run.py --config RUN.json --report REPORT.json

Reports whether frozen (non-trainable) weights are bit-identical before and after training and to
the base model on disk, whether trainable weights moved, and saves the engine's logits on a fixed
batch (rank 0) so a test can compare an exported model against them.
"""

import json
import sys
from pathlib import Path

import torch

from cpt_ds.config import RunConfig
from cpt_ds.distributed import exit_process
from cpt_ds.trainer import Trainer


def full_tensors(module, names):
    """Whole copies of the named parameters (gathered under ZeRO-3), as raw bytes for bitwise compares."""
    import deepspeed

    out = {}
    for name, parameter in module.named_parameters():
        if name in names:
            with deepspeed.zero.GatheredParameters([parameter]):
                out[name] = parameter.detach().cpu().clone()
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: 4-bit weights stored as float32 hold NaN bit patterns, which torch.equal calls unequal."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def main() -> int:
    argv = sys.argv[1:]
    report_path = Path(argv[argv.index("--report") + 1])
    del argv[argv.index("--report"): argv.index("--report") + 2]
    trainer = Trainer(RunConfig.load(argv))
    module = trainer.engine.module
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    frozen_before = full_tensors(module, frozen)
    trainable_before = full_tensors(module, trainable)
    trainer.train()
    frozen_after = full_tensors(module, frozen)
    trainable_after = full_tensors(module, trainable)

    batch = torch.tensor([list(range(5, 37)), list(range(100, 132))])
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine(input_ids=batch).logits.float().cpu()
    report = {
        "num_frozen": len(frozen),
        "num_trainable": len(trainable),
        "frozen_changed": sorted(n for n in frozen if not same_bits(frozen_before[n], frozen_after[n])),
        "trainable_changed": sum(not torch.equal(trainable_before[n], trainable_after[n]) for n in trainable),
    }
    base = trainer.config.model.model_name_or_path
    if base and trainer.config.model.load_in_kbits == 16 and frozen:
        from safetensors.torch import load_file

        disk = load_file(str(Path(base) / "model.safetensors"))
        # peft names wrapped base weights base_model.model.<name> and keeps them under .base_layer.
        matched = 0
        equal = True
        for name, tensor in frozen_after.items():
            key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            key = key.replace(".original_module.", ".")
            if key in disk:
                matched += 1
                equal &= same_bits(disk[key], tensor)
        report["frozen_matched_on_disk"] = matched
        report["frozen_equal_to_disk"] = bool(equal)
    if trainer.rank == 0:
        torch.save({"input_ids": batch, "logits": logits}, report_path.with_suffix(".logits.pt"))
        report_path.write_text(json.dumps(report, indent=2))
    trainer.close()
    return 0


if __name__ == "__main__":
    exit_process(main())
