#!/usr/bin/env bash
# The GPU suite in one command, from any directory (bench/gpu_suite.py says what it runs and where it writes):
#
#   bash bench/gpu_suite.sh               # on a CUDA machine: every part, <= 8 min, rows into bench/RESULTS.md
#   bash bench/gpu_suite.sh --dry-run     # anywhere: every part at tiny size on the CPU, into a copy of RESULTS.md
#   bash bench/gpu_suite.sh --help
#
# First it finds a Python that has the requirements: .venv/bin/python, else python3 (a GPU image that ships
# PyTorch and transformers, with no network to install anything from), else it makes .venv with pip from
# requirements.txt + requirements-test.txt, capped at GPU_SUITE_PIP_TIMEOUT seconds (300; pip can be slow).
# The suite's 8-minute budget counts from here (GPU_SUITE_T0), setup included.
set -uo pipefail
export GPU_SUITE_T0="${GPU_SUITE_T0:-$(date +%s)}"
cd "$(dirname "$0")/.."

has_requirements() {    # found, not imported: importing transformers alone takes seconds
    "$1" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
        ('torch', 'torchvision', 'transformers', 'tokenizers', 'safetensors', 'numpy', 'tqdm', 'PIL', 'pytest')))" \
        >/dev/null 2>&1
}

if [ -x .venv/bin/python ] && has_requirements .venv/bin/python; then
    PY=.venv/bin/python
elif command -v python3 >/dev/null 2>&1 && has_requirements python3; then
    PY=python3
else
    echo "gpu_suite.sh: no Python with the requirements; making .venv (pip, at most ${GPU_SUITE_PIP_TIMEOUT:-300} s)"
    timeout "${GPU_SUITE_PIP_TIMEOUT:-300}" bash -c \
        'python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -r requirements-test.txt'
    echo "gpu_suite.sh: pip exit code $?"
    PY=.venv/bin/python
    if ! has_requirements "$PY"; then
        echo "gpu_suite.sh: .venv still lacks a requirement; going on with python3 (failing parts become FAILED rows)"
        PY=python3
    fi
fi
echo "gpu_suite.sh: $PY: $("$PY" -c 'import sys, torch; print("Python", sys.version.split()[0], "torch", torch.__version__,
      "CUDA", torch.cuda.is_available())' 2>&1 | tail -1); setup took $(( $(date +%s) - GPU_SUITE_T0 )) s"
exec "$PY" bench/gpu_suite.py "$@"
