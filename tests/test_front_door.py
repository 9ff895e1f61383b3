"""The front door: the precision the quick start picks and the workdirs it refuses to delete, the
bf16-on-CPU warning, the test command on a fresh venv, and that every relative link of README.md and
docs/ resolves."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_config
from helpers_data import load_tool

from cpt_ds import hardware
from cpt_ds.config import RunConfig
from cpt_ds.preflight import preflight

AVX2_ONLY = {"fpu", "sse2", "avx", "avx2", "fma"}
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16"}


def test_native_precision_follows_the_cpu_flags():
    assert hardware.cpu_lacks_native("bf16", flags=AVX2_ONLY)
    assert hardware.cpu_lacks_native("fp16", flags=AVX2_ONLY)
    assert not hardware.cpu_lacks_native("bf16", flags=SAPPHIRE_RAPIDS)
    assert not hardware.cpu_lacks_native("fp16", flags=SAPPHIRE_RAPIDS)
    assert not hardware.cpu_lacks_native("bf16", flags={"fp", "asimd", "bf16"})  # Arm (Graviton 3)
    assert not hardware.cpu_lacks_native("fp32", flags=set())
    warning = hardware.slow_cpu_precision_warning("bf16", "ds_configs/zero2.json", flags=AVX2_ONLY,
                                                  capability="AVX2")
    assert warning is not None
    assert "ds_configs/zero2.json asks for bf16" in warning
    assert "PyTorch capability AVX2" in warning and "amx_bf16 / avx512_bf16" in warning
    assert "ds_configs/zero2_fp32.json" in warning
    assert hardware.slow_cpu_precision_warning("bf16", "x.json", flags=SAPPHIRE_RAPIDS, capability="AVX512") is None


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert hardware.cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", "avx512_bf16"}
    assert hardware.cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("flags, warned", [(AVX2_ONLY, True), (SAPPHIRE_RAPIDS, False)])
def test_preflight_warns_once_about_emulated_bf16(assets, tmp_path, monkeypatch, caplog, flags, warned):
    monkeypatch.setattr(hardware, "cpu_flags", lambda *args: flags)
    monkeypatch.setattr(hardware, "cpu_capability", lambda: "AVX2" if warned else "AVX512")
    bf16 = RunConfig.from_flat(run_config(assets, tmp_path / "out", deepspeed=str(REPO / "ds_configs" / "zero2.json")))
    fp32 = RunConfig.from_flat(run_config(assets, tmp_path / "out", deepspeed=str(REPO / "ds_configs" / "zero2_fp32.json")))
    with caplog.at_level(logging.WARNING, logger="cpt_ds"):
        preflight(bf16, world_size=2, rank=0)
        preflight(bf16, world_size=2, rank=1)  # other ranks stay quiet: one warning per run
        preflight(fp32, world_size=2, rank=0)
    messages = [record.getMessage() for record in caplog.records if "has no native bf16" in record.getMessage()]
    assert len(messages) == (1 if warned else 0), messages
    if warned:
        assert "zero2.json asks for bf16" in messages[0] and "ds_configs/zero2_fp32.json" in messages[0]


def test_quick_start_trains_fp32_on_cpus_and_bf16_on_gpus(monkeypatch):
    import torch

    from cpt_ds.toy import choose_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flags in (AVX2_ONLY, SAPPHIRE_RAPIDS):  # even a CPU with native bf16 gains nothing on tiny matmuls
        monkeypatch.setattr(hardware, "cpu_flags", lambda *args, f=flags: f)
        device, precision, ds_json = choose_precision()
        assert device.startswith("cpu") and precision == "fp32" and ds_json == "zero2_fp32.json"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert choose_precision() == ("cuda (NVIDIA H100)", "bf16", "zero2.json")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert choose_precision()[1:] == ("fp32", "zero2_fp32.json")
    assert all((REPO / "ds_configs" / name).is_file() for name in ("zero2.json", "zero2_fp32.json"))


def quickstart(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """tools/quickstart.py as users run it; these calls end before any training."""
    return subprocess.run([sys.executable, str(REPO / "tools" / "quickstart.py"), *args], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)


@pytest.mark.parametrize("inside", ["notes.txt", "train.py"])
def test_quick_start_refuses_a_workdir_it_did_not_make(tmp_path, inside):
    """A folder holding anything the quick start did not make (a checkout, as with --workdir .) stays intact."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / inside).write_text("keep me\n")
    done = quickstart("--workdir", str(folder))
    assert done.returncode == 2, done.stdout[-3000:]
    assert f"--workdir {folder} is not empty and was not made by the quick start" in done.stdout
    assert "pass a new or empty folder" in done.stdout and "Traceback" not in done.stdout
    assert [p.name for p in folder.iterdir()] == [inside] and (folder / inside).read_text() == "keep me\n"


def test_quick_start_refuses_the_current_folder(tmp_path):
    (tmp_path / "README.md").write_text("a checkout\n")
    done = quickstart("--workdir", ".", cwd=tmp_path)
    assert done.returncode == 2 and f"--workdir {tmp_path.resolve()} is not empty" in done.stdout, done.stdout
    assert (tmp_path / "README.md").read_text() == "a checkout\n"


def test_quick_start_remakes_only_its_own_workdir(tmp_path):
    qs = load_tool("quickstart")
    work = tmp_path / "qs"
    qs.prepare_workdir(work)  # new folder: made and marked
    assert [p.name for p in work.iterdir()] == [qs.MARKER]
    (work / "corpus").mkdir()
    (work / "corpus" / "old.jsonl").write_text("{}\n")
    qs.prepare_workdir(work)  # a rerun over its own workdir starts afresh
    assert [p.name for p in work.iterdir()] == [qs.MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    qs.prepare_workdir(empty)  # an empty folder is used as it is
    assert (empty / qs.MARKER).is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(qs.UsageError, match="is a file"):
        qs.prepare_workdir(tmp_path / "file")
    assert qs.eval_steps_for(50) == 10 and qs.eval_steps_for(3) == 1


LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(markdown: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", markdown.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(match.group(1)) for match in re.finditer(r"^#+ (.+)$", text, re.M)}


def broken_links(pages: list[Path]) -> tuple[list[str], int]:
    """``(broken links, number of relative links checked)``; links inside code blocks do not count."""
    broken, checked = [], 0
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto: not ours to check offline
            checked += 1
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.name}: {target} (no heading #{anchor})")
    return broken, checked


def test_every_relative_link_in_readme_and_docs_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) >= 7, pages
    broken, checked = broken_links(pages)
    assert checked >= 7, checked
    assert not broken, broken


def test_the_link_check_catches_dead_files_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# The Title: `x`\n\n[ok](#the-title-x) [ok](page.md) [web](https://example.org/a)\n"
                    "[dead](missing.md) [anchor](page.md#nowhere)\n```\n[in code](ignored.md)\n```\n")
    assert broken_links([page]) == (["page.md: missing.md (no such file)",
                                     "page.md: page.md#nowhere (no heading #nowhere)"], 4)


def test_the_test_command_installs_into_a_fresh_venv(tmp_path):
    """tools/test.sh on a venv that does not exist yet: it creates it, installs .[dev], runs pytest."""
    venv = tmp_path / "fresh-venv"
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(Path(os.sys.prefix))))
    env["CPT_DS_VENV"] = str(venv)
    done = subprocess.run(["bash", str(REPO / "tools" / "test.sh"), "tests/test_front_door.py", "-q",
                           "-k", "every_relative_link"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "creating the virtual environment" in done.stdout
    assert re.search(r"^torch\s+2\.13\.0", done.stdout, re.M), done.stdout[-2000:]
    assert re.search(r"\b1 passed\b", done.stdout), done.stdout[-2000:]
    assert (venv / "bin" / "pytest").exists()
