"""Launch forms users rely on: the launch command, a simulated two-node job and the README's quickstart."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO, Background, eval_records, free_port, launch_env, metrics, run_config, write_config
from helpers_data import load_tool


def test_simulated_two_node_job_on_loopback(assets, tmp_path):
    """Two launchers (node_rank 0 and 1, one rank each, no ssh) form one world of 2, as on two machines."""
    out = tmp_path / "out"
    path = write_config(run_config(assets, out, max_steps=4), tmp_path / "run.json")
    port = free_port()
    nodes = [Background(["--config", str(path)], workdir=tmp_path / f"node{rank}", ranks=1, nodes=2,
                        node_rank=rank, port=port) for rank in (0, 1)]
    codes = [node.wait() for node in nodes]
    log = nodes[0].log.read_text()
    assert codes == [0, 0], log[-4000:] + nodes[1].log.read_text()[-4000:]
    assert "world 2 | ZeRO-2" in log
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4]
    assert (out / "step-00000004" / "cpt_ds_complete.json").is_file()
    assert {p.name for p in (out / "step-00000004").glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}


def test_quickstart_shows_continued_pretraining(tmp_path):
    """The README's main job: corpora -> tokenizer -> pack -> English base model -> CPT on a zh/en replay
    blend, 2 ranks, fp32 on CPU; Chinese falls, English holds, per-set table and plot (fewer steps here)."""
    done = subprocess.run([sys.executable, "tools/quickstart.py", "--workdir", str(tmp_path / "qs"),
                           "--pretrain_steps", "60", "--cpt_steps", "45", "--master_port", str(free_port())],
                          cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-5000:]
    assert "precision fp32 (ds_configs/zero2_fp32.json)" in done.stdout
    table = {m.group(1): [float(v) for v in m.groups()[1:]] for m in re.finditer(
        r"^\s+(before \(base\)|after CPT)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", done.stdout, re.M)}
    zh_before, zh_after = table["before (base)"][1], table["after CPT"][1]
    en_before, en_after = table["before (base)"][2], table["after CPT"][2]
    assert zh_after < zh_before / 2, done.stdout[-2000:]
    assert en_after < en_before + 0.25, done.stdout[-2000:]  # replay holds English
    evals = eval_records(tmp_path / "qs" / "cpt")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 45 and set(evals[-1]["sets"]) == {"zh", "en"}
    trained = [r for r in metrics(tmp_path / "qs" / "cpt") if "loss" in r]
    assert set(trained[-1]["corpora"]) == {"zh", "en"}
    assert (tmp_path / "qs" / "cpt" / "final" / "model.safetensors").is_file()
    # The plots draw curves: a training point every few steps and at least five evaluations per run.
    for run, steps in (("base", 60), ("cpt", 45)):
        trained = [r["step"] for r in metrics(tmp_path / "qs" / run) if "loss" in r]
        assert len(trained) >= steps // 5 and max(b - a for a, b in zip(trained, trained[1:])) <= 5, trained
        assert len(eval_records(tmp_path / "qs" / run)) >= 5
        assert (tmp_path / "qs" / run / "metrics.png").stat().st_size > 10_000
        assert load_tool("plot_run").run_title(tmp_path / "qs" / run) == run
    assert (tmp_path / "qs" / ".cpt_ds_quickstart").is_file()


def test_a_plot_is_titled_by_the_run_folder_name(tmp_path):
    plot_run = load_tool("plot_run")
    assert plot_run.run_title(tmp_path / "runs" / "cpt") == "cpt"
    assert plot_run.run_title(tmp_path / "runs" / "cpt" / ".." / "base") == "base"


def test_one_launch_command_for_hostfiles_and_gpus(tmp_path):
    """cpt_ds/launch.py: the documented hostfile form (no ssh) and the --num_gpus form, nothing else."""
    from cpt_ds.launch import deepspeed_command, write_hostfile

    hostfile = write_hostfile(tmp_path / "hosts", slots=1, num_nodes=2)
    assert hostfile.read_text() == "node0 slots=1\nnode1 slots=1\n"
    assert write_hostfile(tmp_path / "local", slots=2).read_text() == "localhost slots=2\n"
    runner = [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert deepspeed_command("train.py", ["--config", "c.json"], master_port=7, hostfile=hostfile, node_rank=1) == [
        *runner, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "1", "--master_addr", "127.0.0.1",
        "--master_port", "7", "train.py", "--config", "c.json"]
    assert deepspeed_command("train.py", master_port=7, num_gpus=8) == [
        *runner, "--num_gpus", "8", "--master_port", "7", "train.py"]
    with pytest.raises(ValueError, match="exactly one of hostfile= and num_gpus="):
        deepspeed_command("train.py", master_port=7)
