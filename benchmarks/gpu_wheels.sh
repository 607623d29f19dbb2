#!/usr/bin/env bash
# The wheels benchmarks/gpu_acceptance.py needs beyond a machine's preinstalled torch,
# torchvision, timm, transformers, pyarrow, numpy, click, tqdm, matplotlib and pillow:
# Python 3.12, Linux x86_64, binaries only, no dependencies resolved (everything else is there).
#
#   bash benchmarks/gpu_wheels.sh DIR        # here, with network
#   pip install --no-index --no-deps DIR/*.whl   # there, without
#
# wcwidth is ftfy's one dependency. faiss comes as faiss-cpu (19 MB): faiss-gpu wheels are
# hundreds of MB, so the acceptance run measures normsim_inf with torch on the GPU instead.
set -euo pipefail

dir=${1:?usage: gpu_wheels.sh DIR}
python=${PYTHON:-python3}
limit=$((50 * 1024 * 1024))
wheels=(
  open_clip_torch==3.3.0
  ftfy==6.3.1
  wcwidth==0.2.13
  webdataset==1.0.2
  braceexpand==0.1.7
  faiss-cpu==1.15.1
)

mkdir -p "$dir"
"$python" -m pip download --only-binary=:all: --no-deps \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  --dest "$dir" "${wheels[@]}"

count=$(find "$dir" -maxdepth 1 -name '*.whl' | wc -l)
total=$(find "$dir" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
find "$dir" -maxdepth 1 -name '*.whl' -printf '%10s  %f\n' | sort -k2
echo "$count wheels, $total bytes ($((total / 1024 / 1024)) MiB; limit 50 MiB)"
if [ "$count" -ne "${#wheels[@]}" ]; then
  echo "expected ${#wheels[@]} wheels in $dir, found $count" >&2
  exit 1
fi
if [ "$total" -gt "$limit" ]; then
  echo "the wheels exceed 50 MiB" >&2
  exit 1
fi
