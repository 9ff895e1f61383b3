#!/usr/bin/env bash
# Line coverage of cpt_ds/ over the whole suite, the launched ranks and tool subprocesses included.
#
#   bash tools/coverage.sh [pytest arguments]     (default: tests -q; the report ends with the TOTAL line)
#
# Not part of the README's test command: tracing every rank makes the suite slower. Every Python process
# started with COVERAGE_PROCESS_START set (deepspeed's ranks, pack workers, tools run as subprocesses)
# records its own data file through a .pth hook in the venv; `coverage combine` merges them. A process
# killed with SIGKILL (the kill -9 tests) records nothing, as before and after any change.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${CPT_DS_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  bash tools/test.sh --version >/dev/null   # creates the venv and installs what the tests need
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q "coverage>=7.4"
site_packages="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "import coverage; coverage.process_startup()" > "$site_packages/cpt_ds_coverage.pth"

data_dir="$PWD/.coverage-data"
rm -rf "$data_dir"
mkdir -p "$data_dir"
cat > "$data_dir/coveragerc" <<RC
[run]
source = $PWD/cpt_ds
parallel = true
sigterm = true
concurrency = thread,multiprocessing
data_file = $data_dir/cov
[report]
precision = 1
RC

if [ "$#" -eq 0 ]; then
  set -- tests -q
fi
status=0
COVERAGE_PROCESS_START="$data_dir/coveragerc" DS_ACCELERATOR=cpu \
  python -m coverage run --rcfile="$data_dir/coveragerc" -m pytest "$@" || status=$?
python -m coverage combine --quiet --rcfile="$data_dir/coveragerc"
python -m coverage report --rcfile="$data_dir/coveragerc" | tail -n "${CPT_DS_COVERAGE_LINES:-60}"
exit "$status"
