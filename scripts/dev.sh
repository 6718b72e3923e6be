#!/usr/bin/env bash
# cellseg1d developer entry point: sets up .venv (if needed), then runs a task.
#   scripts/dev.sh setup        create/update .venv only
#   scripts/dev.sh demo [ARGS]  set up, then run `cellseg1d demo`
#   scripts/dev.sh test [ARGS]  set up, then run the whole test suite (pytest ARGS)
set -euo pipefail
cd "$(dirname "$0")/.."

task=${1:-test}
shift || true

python_bin=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
    echo "cellseg1d needs Python >= 3.11; $python_bin is $("$python_bin" --version 2>&1). Set PYTHON=/path/to/python3.11" >&2
    exit 2
fi

setup() {
    if [ ! -x .venv/bin/python ]; then
        echo "==> creating .venv with $python_bin"
        "$python_bin" -m venv .venv
    fi
    local pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
    echo "==> installing torch and torchvision (pinned, first)"
    "${pip[@]}" install torch==2.14.1 torchvision==0.29.1
    echo "==> installing cellseg1d and its bundled plugins"
    local plugin_args=()
    for project in plugins/*/pyproject.toml; do plugin_args+=(-e "$(dirname "$project")"); done
    "${pip[@]}" install -e '.[test]' "${plugin_args[@]}"
}

case "$task" in
    setup) setup ;;
    demo) setup; exec .venv/bin/cellseg1d demo "$@" ;;
    test) setup; exec .venv/bin/python -m pytest "$@" ;;
    *) echo "usage: scripts/dev.sh setup|demo|test [args]" >&2; exit 2 ;;
esac
