#!/bin/bash
# Fill the ignored folder .gpu/ with what bench/device_check.sh and bench/device_recipe.sh read on
# the GPU machine (which reaches no network): the CIFAR-10 Parquet, lightly's wheel and Kornia's
# wheels for the machine's Python 3.12. Run here, from the repository root, before the device call:
#     bash bench/prepare_device.sh [folder with train.parquet and test.parquet]
# then carry .gpu (the device tool's carry: [".gpu"]). Prints the size that will travel: the
# working tree and the carried paths together must stay under 64 MiB.
set -euo pipefail
DATA=${1:-../shared/data/cifar10}
mkdir -p .gpu/cifar10
cp -f "$DATA/train.parquet" "$DATA/test.parquet" .gpu/cifar10/
python3 -m pip download -q --no-deps -d .gpu lightly==1.6.0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu \
    kornia==0.9.0 kornia_rs==0.2.0
tree_bytes=$(git ls-files -z | xargs -0 cat | wc -c)
gpu_bytes=$(du -sb .gpu | cut -f1)
total=$(( (tree_bytes + gpu_bytes) / 1048576 ))
ls -l .gpu .gpu/cifar10
echo "travels: about $total MiB (limit 64)"
(( total < 64 )) || { echo "over the carry limit: leave Kornia's wheels out" >&2; exit 1; }
