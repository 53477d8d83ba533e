#!/bin/bash
# Issue 9's wall-clock recipe, second device call (about 7 minutes; after bench/device_check.sh
# when the device time left allows both): cifar10_wallclock against two variants, 120 s of
# training each on the same GPU, one decode of the data. The LR has been measured (BENCHMARKS.md,
# section "Time to accuracy on CIFAR-10 (cifar10_wallclock)"); not yet for short budgets: K and
# the batch size.
#   k1000: model.n_prototypes=1000 (lightly's CIFAR-10 recipe uses 512; we use 3000)
#   b256:  optim.batch_size=256 at the same rate per image (lr 1.2): twice the updates per epoch
#   b1024: optim.batch_size=1024 (lr 4.8), not run by default: for a step bound by the host,
#          twice the images per launch might buy more images/s than the updates it gives up;
#          replayed as CUDA graphs the step runs as long as its kernels, which favours b256 instead
#   mc:    SwAV's multi-crop, 2x32 + 4x16 (about 1.5x the work per image), not run by default:
#          more views per image against fewer images in the budget (RECIPES=ours,mc)
#   eager: the model not compiled (model.compile=false), as the recipe was before it replayed
#          the model as CUDA graphs for more images a second: does the kNN at 120 s follow?
#          (RECIPES=ours,eager)
#   compiled: compiled without CUDA graphs (model.compile_mode=default; a slower step than with
#          them: BENCHMARKS.md, section "CUDA graphs and torch.compile"), not run by default
# Needs .gpu/cifar10/{train,test}.parquet in the checkout (carried; bash bench/prepare_device.sh).
# Run from the repository root. RECIPES picks others, e.g. RECIPES=ours,lightly: ours against
# lightly's published CIFAR-10 recipe in one call (lightly's wheel in .gpu/; about 5 minutes).
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}  # the device tool sets $OUT
mkdir -p "$OUT" && echo "output: $OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .gpu/lightly-*.whl && export PYTHONPATH=/tmp/site  # (for RECIPES with lightly)
nvidia-smi -L
S=$(date +%s)
VARIANTS="k1000:model.n_prototypes=1000;b256:optim.batch_size=256,optim.lr=1.2"
VARIANTS+=";b1024:optim.batch_size=1024,optim.lr=4.8,swav.freeze_prototypes_iters=50"
VARIANTS+=";mc:crops.nmb_crops=[2,4],crops.size_crops=[32,16],crops.min_scale_crops=[0.14,0.05]"
VARIANTS+=",crops.max_scale_crops=[1.0,0.14];eager:model.compile=false"
VARIANTS+=";compiled:model.compile_mode=default"
timeout 540 python3 bench/bench_time_to_accuracy.py --data .gpu/cifar10 --budget 120 \
    --marks 60,120 --recipes "${RECIPES:-ours,k1000,b256}" --workers 15 --cf-images 0 \
    --variants "$VARIANTS" \
    2>&1 | grep -v Warning | tee "$OUT/recipe.jsonl"
echo "== done at $(( $(date +%s) - S )) s"
