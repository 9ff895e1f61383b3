"""Launch forms users rely on: a simulated two-node job and the README's quickstart."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO, Background, eval_records, free_port, launch_env, metrics, run_config, write_config


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


def test_quickstart_learns(tmp_path):
    """The README's main job: corpus -> tokenizer -> pack -> ZeRO-2 on 2 ranks -> before/after table."""
    done = subprocess.run([sys.executable, "-m", "cpt_ds.quickstart", "--workdir", str(tmp_path / "qs"),
                           "--master_port", str(free_port())], cwd=REPO, env=launch_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:]
    table = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+(before|after)\s+[\d.]+\s+[\d.]+\s+([\d.]+)$",
                                                                  done.stdout, re.M)}
    assert table["after"] < table["before"] / 4, done.stdout[-2000:]
    evals = eval_records(tmp_path / "qs" / "run")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 300
    assert (tmp_path / "qs" / "run" / "final" / "model.safetensors").is_file()
