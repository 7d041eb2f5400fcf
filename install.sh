#!/usr/bin/env bash
# Set up specdec in ./.venv from nothing: PyTorch first (pinned), then the package (its native
# kernels are compiled here, a few seconds with the system's C++ compiler) with its test tools.
# --llamacpp also installs llama-cpp-python (the llama.cpp peers and backend), which builds
# llama.cpp from source: about 5 minutes. Run it again at any time: what is there is kept.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    cat <<'EOF'
Usage: ./install.sh [--llamacpp] [--help]

Install specdec into ./.venv (created if missing): torch first (pinned, so that nothing
later pulls another, multi-GB build), then specdec itself, editable, with its test tools (pytest, ruff). Running it again is
fast: what is already installed is kept.

Options:
  --llamacpp   also install llama-cpp-python (pyproject's `llamacpp` extra): the
               llama.cpp peers of `specdec bench` (llamacpp-ar, llamacpp-pld) and
               `--backend llamacpp`. It builds llama.cpp from source (about 5 minutes);
               without it those are skipped, with the reason, by bench and the tests.
  -h, --help   show this help and exit

Environment:
  PYTHON                 the Python that creates .venv (default python3; 3.11 or newer)
  SPECDEC_TORCH_VERSION  the torch version installed first (default 2.13.0)
EOF
}

llamacpp=0
for arg in "$@"; do
    case "$arg" in
        --llamacpp) llamacpp=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "install.sh: unknown option '$arg' (see ./install.sh --help)" >&2
            exit 2
            ;;
    esac
done

PY="${PYTHON:-python3}"
TORCH="${SPECDEC_TORCH_VERSION:-2.13.0}"
VPY=.venv/bin/python

now_us() { # wall clock in microseconds (EPOCHREALTIME: bash 5; whole seconds before that)
    if [ -n "${EPOCHREALTIME:-}" ]; then
        echo "${EPOCHREALTIME/[.,]/}"
    else
        echo "$(($(date +%s) * 1000000))"
    fi
}
seconds_since() { # one decimal
    local d=$(($(now_us) - $1))
    echo "$((d / 1000000)).$((d / 100000 % 10))"
}

current=""
trap 'rc=$?; [ "$rc" = 0 ] || echo "[install] failed (exit $rc) in stage: ${current:-setup}" >&2' EXIT
stage() { # stage LABEL COMMAND...: run it, then one line with its elapsed seconds
    current=$1
    shift
    local t
    t=$(now_us)
    "$@"
    echo "[install] ${current}: $(seconds_since "$t") s" >&2
}

make_venv() {
    if [ ! -x "$VPY" ]; then
        "$PY" -m venv .venv
    fi
    "$VPY" -m pip install --quiet --upgrade pip
}

installed_version() { # the installed version of a distribution, or nothing
    "$VPY" -c "import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass" "$1"
}

install_torch() {
    # torch first, pinned, so that nothing later pulls a multi-GB CUDA build on a CPU machine
    if [ -z "$(installed_version torch)" ]; then
        "$VPY" -m pip install --quiet "torch==$TORCH"
    fi
}

STAMP=.venv/.specdec-installed
specdec_up_to_date() { # installed, and nothing its build reads changed since (the .so is kept)
    [ -f "$STAMP" ] && [ -n "$(installed_version specdec)" ] &&
        compgen -G "src/specdec/kernels/_qgemm*.so" >/dev/null &&
        [ -z "$(find pyproject.toml setup.py src/specdec/kernels -newer "$STAMP" \
            \( -name pyproject.toml -o -name setup.py -o -name '*.cpp' -o -name '*.h' \) \
            ! -path '*/__pycache__/*' -print -quit)" ]
}

install_specdec() {
    # editable: Python changes need no reinstall; the native kernels are built here
    if ! specdec_up_to_date; then
        rm -f "$STAMP"
        "$VPY" -m pip install --quiet -e ".[test]"
        touch "$STAMP"
    fi
}

install_llamacpp() {
    # the `llamacpp` extra's requirements, read from pyproject.toml (one place for the pin)
    local reqs=() line
    while IFS= read -r line; do
        reqs+=("$line")
    done < <("$VPY" -c "import tomllib
with open('pyproject.toml', 'rb') as f:
    print('\n'.join(tomllib.load(f)['project']['optional-dependencies']['llamacpp']))")
    "$VPY" -m pip install --quiet "${reqs[@]}"
}

start=$(now_us)
stage "venv and pip" make_venv
have=$(installed_version torch)
stage "torch ${have:-$TORCH}${have:+ (already installed)}" install_torch
label="specdec with pytest, ruff"
specdec_up_to_date && label+=" (up to date)"
stage "$label" install_specdec
if [ "$llamacpp" = 1 ]; then
    have=$(installed_version llama-cpp-python)
    stage "llama-cpp-python ${have:-(builds llama.cpp, about 5 min)}${have:+ (already installed)}" \
        install_llamacpp
fi
current=""
extra=""
[ "$llamacpp" = 1 ] || extra="; without llama.cpp: ./install.sh --llamacpp adds it"
echo "specdec installed: $(.venv/bin/specdec --version) in $(pwd)/.venv" \
    "($(seconds_since "$start") s$extra)" >&2
