#!/usr/bin/env bash
# The CPU test suite under another torch / triton than the development environment's, e.g. the GPU image's:
#   bash tools/test_other_torch.sh 2.11.0 3.6.0 [pytest arguments, default: tests]
# A venv (O2S_OTHER_VENV, default /tmp/o2s-torch-TORCH) layered on this Python's site-packages (transformers, av,
# soundfile, ... come from there) gets torch==TORCH and triton==TRITON from the registry. PyPI's Linux torch is a
# CUDA build: about 4.5 GB on disk with its CUDA libraries, downloaded once; it runs on the CPU here. The committed
# tree (git archive HEAD, no uncommitted edits) is unpacked beside it, its extension built in place for the CPU
# against that torch, and pytest run there with a fresh torch.compile cache. Exit status: pytest's.
set -euo pipefail
TORCH=${1:?torch version, e.g. 2.11.0}
TRITON=${2:?triton version, e.g. 3.6.0}
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${O2S_OTHER_VENV:-/tmp/o2s-torch-$TORCH}
SRC=$VENV/src
BASE=$(python3 -c "import site; print(site.getsitepackages()[0])")
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  PYV=$("$VENV/bin/python" -c "import sys; print(f'python{sys.version_info[0]}.{sys.version_info[1]}')")
  echo "$BASE" > "$VENV/lib/$PYV/site-packages/_base.pth"
fi
"$VENV/bin/python" -c "import torch, triton, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH' or triton.__version__ != '$TRITON')" \
  2>/dev/null || "$VENV/bin/pip" install -q "torch==$TORCH" "triton==$TRITON"
rm -rf "$SRC" && mkdir -p "$SRC"
git -C "$ROOT" archive HEAD | tar -x -C "$SRC"
(cd "$SRC" && OMNI2SOUND_SKIP_CUDA=1 "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . > build.log 2>&1) \
  || { tail -40 "$SRC/build.log"; exit 1; }
"$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
cd "$SRC"
export TORCHINDUCTOR_CACHE_DIR
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rf "${@:-tests}"
