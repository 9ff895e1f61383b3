#!/usr/bin/env bash
# Install cpt-ds into a virtual environment and run the main job on its built-in default:
# a real-text corpus shipped with Python -> tokenizer -> token file -> a tiny LLaMA-3-shaped model
# trained with ZeRO-2 on 2 ranks through the deepspeed launcher -> loss/accuracy/perplexity before
# and after. CPU or GPU; a few minutes on a 2-core CPU.
#
#   bash tools/quickstart.sh [--workdir quickstart_out] [--pretrain_steps 70] [--cpt_steps 50]
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${CPT_DS_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch may pull a multi-GB build that does not match this machine.
python -m pip install -q torch==2.13.0
# The plot extra: the quick start ends by drawing the run (tools/plot_run.py).
python -m pip install -q -e ".[plot]"
exec python tools/quickstart.py "$@"
