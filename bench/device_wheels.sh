#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on a bare GPU machine: Python 3.12, a CUDA build of torch,
# transformers, numpy, pyyaml and huggingface-hub already there, no network. Fetches the cp312
# manylinux wheels of what is missing (diffusers, pydantic and what they need), at the versions
# of this checkout's .venv (what the tests ran), and builds rsseg's own wheel (its entry points
# register the methods). Everything lands in one folder (default .whl, git-ignored), checked to
# fit the 64 MiB a device call may carry.
#
#   bench/device_wheels.sh [DIR]
#
# On the GPU machine (docs/benchmarks.md, "GPU check"):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
#   python3 bench/gpu_check.py --rates rates.json
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
py=${PYTHON:-.venv/bin/python}
limit_mib=64
# diffusers' and pydantic's own needs, less what the GPU image has (filelock, huggingface-hub,
# numpy, Pillow, regex, requests, safetensors, typing-extensions)
packages=(diffusers importlib-metadata pydantic pydantic-core annotated-types typing-inspection)

version() { "$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

rm -rf "$out"
mkdir -p "$out"
for name in "${packages[@]}"; do
  spec="$name==$(version "$name")"
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$out" "$spec"
done
"$py" -m pip wheel -q --disable-pip-version-check --no-deps -w "$out" .
size_kib=$(du -sk "$out" | cut -f1)
ls -1 "$out"
echo "$(ls "$out" | wc -l) wheels, $((size_kib / 1024)) MiB in $out"
if [ "$size_kib" -gt $((limit_mib * 1024)) ]; then
  echo "error: $out is $((size_kib / 1024)) MiB, over the $limit_mib MiB a device call carries" >&2
  exit 1
fi
