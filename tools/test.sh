#!/usr/bin/env bash
# The README's test command: reuse or create the venv, install what the tests need, run pytest on CPU.
#
#   bash tools/test.sh [pytest arguments]        (default: the whole suite on 2 workers)
#
# CPT_DS_VENV picks the venv (default .venv, the one tools/quickstart.sh makes), so running this
# before or after the quick start works the same; .ci/run calls exactly this with a fresh venv.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${CPT_DS_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating the virtual environment $VENV" >&2
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build that does not match this machine.
# Bytecode afterwards on every core: pip compiles each file it installs on one core, most of a fresh
# install's time; compileall skips files already compiled. Like pip, it leaves as source the few files
# that do not compile for this Python (torch's Python-3.12-only test helpers), hence its status ignored.
python -m pip install -q --no-compile torch==2.13.0
python -m pip install -q --no-compile -e ".[dev]"
python -m compileall -qq -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
python -m pip list 2>/dev/null | grep -iE "^(torch|deepspeed|transformers|peft|bitsandbytes|tokenizers|tiktoken) " || true

if [ "$#" -eq 0 ]; then
  # Two pytest workers, each with its own rank pools, a whole test file at a time (module-scoped runs
  # are trained once) in collection order (the longest files first, tests/conftest.py): one worker's
  # single-threaded stretches (imports, launcher start-up, tokenizer and packing work) fill the core
  # the other leaves idle (docs/testing.md).
  set -- tests -q -n 2 --dist loadfile --no-loadscope-reorder
fi
DS_ACCELERATOR=cpu exec python -m pytest "$@"
