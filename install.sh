#!/usr/bin/env bash
# Sets up a working umr environment from nothing; safe to run again (a no-op run takes seconds).
#
#   bash install.sh            # inside an active virtualenv: installs into it
#                              # otherwise: creates ./.venv and installs there
#
# Environment variables:
#   PYTHON=python3.11          interpreter used to create .venv (default: python3)
#   FORCE_CUDA=1               build the CUDA rasterizer kernel even if torch sees no GPU
#                              (it is built anyway whenever nvcc and a CUDA build of torch exist)
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1

if [ -n "${VIRTUAL_ENV:-}" ]; then
  py="$VIRTUAL_ENV/bin/python"
  echo "install.sh: using the active virtual environment $VIRTUAL_ENV"
else
  if [ ! -x .venv/bin/python ]; then
    echo "install.sh: creating .venv/"
    "${PYTHON:-python3}" -m venv .venv
  fi
  py="$PWD/.venv/bin/python"
  echo "install.sh: using $PWD/.venv (activate it with: source .venv/bin/activate)"
fi

have() {  # have <distribution> <version>: is exactly this version installed?
  "$py" - "$1" "$2" <<'PY'
import sys
from importlib import metadata
try:
    sys.exit(0 if metadata.version(sys.argv[1]).split("+")[0] == sys.argv[2] else 1)
except metadata.PackageNotFoundError:
    sys.exit(1)
PY
}

# 1. torch + torchvision first: everything else (and the extension build) needs them.
if have torch "$TORCH_VERSION" && have torchvision "$TORCHVISION_VERSION"; then
  echo "install.sh: torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION present"
else
  "$py" -m pip install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# 2. pinned requirements (pip is quick when all are satisfied, but skip it entirely if so).
if "$py" - requirements.txt <<'PY'
import sys, re
from importlib import metadata
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, version = re.split(r"==", line)
    try:
        if metadata.version(name) != version:
            sys.exit(1)
    except metadata.PackageNotFoundError:
        sys.exit(1)
PY
then
  echo "install.sh: pinned requirements present"
else
  # build tools first (the extension build below uses them without build isolation)
  "$py" -m pip install $(grep -E '^(setuptools|ninja)==' requirements.txt)
  "$py" -m pip install --no-build-isolation -r requirements.txt
fi

# 3. this repo, editable, with the rasterizer extension. Rebuilt only when its sources changed.
stamp=build/.umr_ext_stamp
sources_hash=$(cat setup.py $(find external -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' \) | sort) 2>/dev/null \
  | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sources_hash:$py" ] && "$py" -c "import sys, umr; sys.exit(0 if umr.available_kernels() else 1)" 2>/dev/null; then
  echo "install.sh: umr (editable) and its extension are up to date"
else
  "$py" -m pip install --no-build-isolation --no-deps -e .
  mkdir -p build && echo "$sources_hash:$py" > "$stamp"
fi

"$py" -c "import umr, torch; print('install.sh: ok - umr', umr.__version__, '| torch', torch.__version__, '| rasterizer kernels:', umr.available_kernels())"
