#!/usr/bin/env bash
# The prepared device check: what only a GPU shows, in one short run (a lent GPU gives a session about 15
# minutes in all). benchmarks/fullsize.py on CUDA with bf16 mixed precision: SD 1.5's shape at 512 px, then
# SDXL's at 1024 px (ARCHS picks), each stage in its own process: a guard, verify, full / guarded / LoRA
# fine-tuning steps (time and peak GPU memory, side by side), a mask step against a plain step, guard learning's
# peak, immunising. Each architecture's figures land in $OUT/fullsize-<arch>.json and $OUT/<arch>.txt.
#
# The GPU image has torch, transformers, accelerate and peft but not diffusers: carry its wheel. Here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl "diffusers==$(grep -i '^diffusers==' constraints.txt | cut -d= -f3)" importlib_metadata
# then, with the device tool: run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=600),
# once per architecture if one call would outlast 10 minutes (ARCHS=sd15, then ARCHS=sdxl, on the warm machine).
# A dry run of the same steps on this CPU, in a minute: DEVICE=cpu PRECISION=no WIDTH=8 RES=64 bash benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-runs/device}"
DEVICE="${DEVICE:-cuda}"
PRECISION="${PRECISION:-bf16}"
WIDTH="${WIDTH:-1}"
THREADS="${THREADS:-$(nproc)}"
mkdir -p "$OUT"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
for arch in ${ARCHS:-sd15 sdxl}; do
  res="${RES:-$([ "$arch" = sdxl ] && echo 1024 || echo 512)}"
  work="/tmp/fullsize-$arch"
  python3 benchmarks/fullsize.py --arch "$arch" --width-divisor "$WIDTH" --resolution "$res" --device "$DEVICE" \
    --mixed-precision "$PRECISION" --threads "$THREADS" --work "$work" 2>&1 | tee "$OUT/$arch.txt"
  cp "$work/fullsize.json" "$OUT/fullsize-$arch.json"
done
