"""Shared fixtures: a tiny tokenizer, packed token files, a tiny LLaMA-3-shaped base model, and a
launcher that runs train.py (and test drivers) on 2 gloo ranks through the deepspeed launcher.

Every launch gets its own free port, and DeepSpeed's /dev/shm buffers for that port are deleted
afterwards (132 MiB per port otherwise stay in RAM, ../shared/docs/CPU_DEEPSPEED.md).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cpt_ds.distributed import free_port, remove_shm_buffers
from cpt_ds.launch import deepspeed_command, write_hostfile
from cpt_ds.toy import TINY_MODEL, python_corpus_texts
from helpers_pool import RankPool

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
DRIVERS = Path(__file__).parent / "drivers"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The packer caches fast-encoder verdicts per tokenizer; the many tiny test tokenizers stay out of
# the user's cache (launched processes inherit this too).
os.environ.setdefault("CPT_DS_CACHE_DIR", tempfile.mkdtemp(prefix="cpt_ds_test_cache_"))


def ds_json(stage: int, *, micro: int = 4, accumulation: int = 1, **extra: Any) -> dict[str, Any]:
    """fp32 DeepSpeed configs for CPU tests (bitwise resume needs fp32 and torch's AdamW)."""
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
            "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, **extra}


@pytest.fixture(autouse=True)
def restore_logging():
    """Tools and train.py called in-process configure logging (``basicConfig(force=True)`` onto the
    stream pytest is capturing for that test); a later test must not log into that closed stream."""
    names = ["", "cpt_ds", "DeepSpeed", "transformers"]
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level) for name in names}
    yield
    for name, (handlers, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)


@dataclass
class Assets:
    root: Path
    tokenizer: Path
    corpus: Path
    """Token-file prefix of the main training corpus (Python's reference manual)."""
    corpus_b: Path
    """A second, different token file (for blended data_path and 'changed data' tests)."""
    model_config: Path
    """Folder with the tiny model's config.json (from-scratch runs)."""
    base_model: Path
    """A saved random-init tiny model + tokenizer (LoRA / QLoRA / export runs)."""
    ds: dict[str, Path]


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt_ds.pack.packing import PackOptions, pack_corpus
    from cpt_ds.pack.tiny_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("assets")
    texts = python_corpus_texts()
    tokenizer = train_tokenizer(texts, root / "tokenizer", vocab_size=TINY_MODEL["vocab_size"])
    half = len(texts) // 2
    for name, part in (("corpus", texts[:half]), ("corpus_b", texts[half:])):
        source = root / "text" / f"{name}.jsonl"
        source.parent.mkdir(exist_ok=True)
        source.write_text("".join(json.dumps({"text": t}) + "\n" for t in part), encoding="utf-8")
        pack_corpus([source], tokenizer, root / "data" / name, PackOptions(), workers=1)
    model_config = root / "model_config"
    model_config.mkdir()
    (model_config / "config.json").write_text(json.dumps(TINY_MODEL, indent=2))
    torch.manual_seed(0)
    base = root / "base_model"
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_MODEL.items() if k != "architectures"})).save_pretrained(base)
    for file in tokenizer.iterdir():
        shutil.copy2(file, base / file.name)
    ds = {}
    for name, config in {"zero2": ds_json(2), "zero3": ds_json(3), "zero2_ga2": ds_json(2, micro=2, accumulation=2),
                         "zero3_ga2": ds_json(3, micro=2, accumulation=2)}.items():
        ds[name] = root / f"ds_{name}.json"
        ds[name].write_text(json.dumps(config, indent=2))
    return Assets(root=root, tokenizer=tokenizer, corpus=root / "data" / "corpus", corpus_b=root / "data" / "corpus_b",
                  model_config=model_config, base_model=base, ds=ds)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tokenizer tests' LLaMA-3-shaped tokenizer (Chinese + English training text, 1,024 ids)."""
    from helpers_data import train_tiny_tokenizer

    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny"))


def run_config(assets: Assets, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A small from-scratch full-finetuning run on the tiny model; override any field."""
    config = {
        "config_name": str(assets.model_config), "tokenizer_name_or_path": str(assets.tokenizer),
        "full_finetuning": True, "data_path": [str(assets.corpus)], "block_size": 32,
        "validation_split_percentage": 0.05, "max_eval_samples": 16, "deepspeed": str(assets.ds["zero2"]),
        "output_dir": str(output_dir), "max_steps": 6, "learning_rate": 3e-3, "warmup_steps": 1,
        "logging_steps": 1, "seed": 7, "export_final": False,
    }
    config.update(overrides)
    return config


def lora_config(assets: Assets, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    config = run_config(assets, output_dir, full_finetuning=False, model_name_or_path=str(assets.base_model),
                        lora_rank=4, lora_alpha=8, lora_dropout=0.1, modules_to_save="embed_tokens,lm_head",
                        learning_rate=1e-2)
    del config["config_name"]
    config.update(overrides)
    return config


def write_config(config: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


# --------------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    returncode: int
    output: str
    port: int

    def check(self) -> Launch:
        assert self.returncode == 0, f"launch failed with {self.returncode}:\n{self.output[-6000:]}"
        return self


def launcher_command(script: Path, args: list[str], *, ranks: int, port: int, workdir: Path,
                     node_rank: int = 0, nodes: int = 1) -> list[str]:
    hostfile = write_hostfile(workdir / f"hostfile_{nodes}x{ranks}", slots=ranks, num_nodes=nodes)
    return deepspeed_command(script, args, master_port=port, hostfile=hostfile, node_rank=node_rank)


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch(args: list[str], *, workdir: Path, ranks: int = 2, script: Path = TRAIN, timeout: float = 600,
           cwd: Path = REPO, launcher: bool = False) -> Launch:
    """Run ``script args`` on ``ranks`` gloo ranks from folder ``cwd``; never raises on failure.

    Jobs run on the session's rank pool of that size (tests/helpers_pool.py); ``launcher=True``
    starts the real deepspeed launcher, for what only a fresh launch shows (a world-size change
    resumed in a fresh process, launcher exit codes).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if not launcher:
        code, output = rank_pool(ranks).run(script, args, cwd=cwd, env=launch_env(), workdir=workdir, timeout=timeout)
        return Launch(returncode=code, output=output, port=0)
    port = free_port()
    command = launcher_command(script, args, ranks=ranks, port=port, workdir=workdir)
    try:
        done = subprocess.run(command, cwd=cwd, env=launch_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    finally:
        remove_shm_buffers(port)
    return Launch(returncode=done.returncode, output=done.stdout, port=port)


_POOLS: dict[int, RankPool] = {}


def rank_pool(num_ranks: int) -> RankPool:
    if num_ranks not in _POOLS:
        _POOLS[num_ranks] = RankPool(num_ranks, launcher_command, launch_env)
    return _POOLS[num_ranks]


LONGEST_MODULES_FIRST = ("test_preemption.py", "test_launch.py", "test_front_door.py", "test_resume.py",
                         "test_export.py", "test_rank_pool.py")
"""The modules with the most real launches, longest first (pytest --durations summed per module).
The test command's two workers take whole modules in collection order; started first, these never leave
one worker running a long module alone at the end."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest modules first; ``CPT_DS_TEST_ORDER=reverse`` or ``random:SEED`` runs the suite in another
    order instead, to show that no test depends on what an earlier one left behind (modules stay whole,
    as pytest-randomly keeps them)."""
    order = os.environ.get("CPT_DS_TEST_ORDER", "")
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    groups = list(modules.values())
    if not order:
        rank = {name: position for position, name in enumerate(LONGEST_MODULES_FIRST)}
        groups.sort(key=lambda group: rank.get(Path(group[0].nodeid.split("::")[0]).name, len(rank)))
    elif order == "reverse":
        groups = [group[::-1] for group in groups[::-1]]
    elif order.startswith("random:"):
        shuffle = random.Random(int(order.removeprefix("random:"))).shuffle
        shuffle(groups)
        for group in groups:
            shuffle(group)
    else:
        raise pytest.UsageError(f"CPT_DS_TEST_ORDER={order!r}: use reverse or random:SEED")
    items[:] = [item for group in groups for item in group]


def pytest_sessionfinish(session: pytest.Session) -> None:
    for pool in _POOLS.values():
        pool.shutdown()


def train(config: dict[str, Any], *, workdir: Path, ranks: int = 2, extra: list[str] | None = None,
          launcher: bool = False) -> Launch:
    path = write_config(config, workdir / f"run_{len(list(workdir.glob('run_*.json')))}.json")
    return launch(["--config", str(path), *(extra or [])], workdir=workdir, ranks=ranks, launcher=launcher)


class Background:
    """A launch running in its own session, so kill -9 reaches the launcher and every rank at once."""

    def __init__(self, args: list[str], *, workdir: Path, ranks: int = 2, script: Path = TRAIN,
                 port: int | None = None, nodes: int = 1, node_rank: int = 0):
        self.port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / f"background_{self.port}_{node_rank}.log"
        command = launcher_command(script, args, ranks=ranks, port=self.port, workdir=workdir, nodes=nodes,
                                   node_rank=node_rank)
        self._log_handle = open(self.log, "w")
        self.process = subprocess.Popen(command, cwd=REPO, env=launch_env(), stdout=self._log_handle,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, condition, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"launch ended ({self.process.returncode}) before the condition:\n"
                                     + self.log.read_text()[-4000:])
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError("timed out waiting:\n" + self.log.read_text()[-4000:])
            time.sleep(0.05)

    def wait(self, timeout: float = 600) -> int:
        """Wait for a normal end; returns the exit code."""
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self._log_handle.close()
            remove_shm_buffers(self.port)
        return code

    def kill(self) -> None:
        """kill -9 of the whole job: the launcher and every rank."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self._log_handle.close()
        remove_shm_buffers(self.port)


def metrics(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(output_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(output_dir) if "loss" in r]


def eval_records(output_dir: Path) -> list[dict[str, Any]]:
    return [r for r in metrics(output_dir) if "eval_loss" in r]
