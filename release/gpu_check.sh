#!/usr/bin/env bash
# The project's GPU check, for whoever is lent a machine with a CUDA GPU.
#
#   release/gpu_check.sh wheels
#       here, with the package registries: the wheels a bare GPU machine
#       lacks (mmengine, mmdet, pycocotools, ...) into .whl/ (ignored by git),
#       and mmcv 2.1.0 as a pure-Python wheel: the venv's build with its
#       compiled ops taken out. Needs the project's venv (make venv). 6 MiB.
#   release/gpu_check.sh [OUT_DIR]
#       there, with no network: installs those wheels beside the machine's
#       own torch, then runs the CUDA tests (pytest -m cuda), the GPU
#       benchmark at 800x1333, the deformable-attention benchmark and
#       tools/ptq.py / mmdet's test.py on the shipped small models, writing
#       at most 8 files into OUT_DIR (default
#       $OUT, else results/gpu_check). Under 8 minutes on one H200.
#
#   REHEARSE=1 PYTHON=... release/gpu_check.sh DIR
#       a rehearsal on a machine without a GPU (e.g. a Python 3.12 venv with
#       the device's torch version built for the CPU and its packages): the
#       same set-up, the CUDA tests dry-run with --gpu-device cpu, the
#       benchmarks on the CPU at a small size, every time limit times
#       TIME_SCALE (default 1). It shows that the script runs, not GPU
#       figures.
#
# mmcv there has no compiled ops (mmcv builds them against one torch; none
# exists for the machine's): mmcv.ops then cannot even be imported, so a
# stand-in mmcv/_ext.py whose every function raises is written beside it,
# as mmcv behaves when built without CUDA. The plugin notices on the first
# CUDA run and routes deformable attention to mmcv's PyTorch path (one log
# line). With a real CUDA build of mmcv nothing is written and mmcv's
# kernel runs the first-order passes.
set -euo pipefail
cd "$(dirname "$0")/.."

# a pinned version, from its one source (setup.py, requirements.txt)
pin() { grep -ho "$1==[0-9][0-9a-z.]*" setup.py requirements.txt | head -1 \
          | cut -d= -f3; }

if [ "${1:-}" = wheels ]; then
  MMCV=$(pin mmcv)
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || {
    mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
  plat=""
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plat="$plat --platform $p"
  done
  # what mmengine/mmcv/mmdet need and the machine's image does not hold
  # (it has numpy, scipy, matplotlib, opencv, pillow, rich, pyyaml, tqdm;
  # six too, but a rehearsal's venv may not)
  python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp $plat -d .whl \
    "mmengine==$(pin mmengine)" "mmdet==$(pin mmdet)" pycocotools shapely \
    addict yapf \
    termcolor terminaltables platformdirs six
  # mmcv: the venv's own build (pip's cache, or a build from the sdist),
  # its compiled ops taken out and the wheel retagged pure Python
  rm -rf /tmp/mmcv-wheel
  .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation \
    "mmcv==$MMCV" -w /tmp/mmcv-wheel
  .venv/bin/python - /tmp/mmcv-wheel/mmcv-"$MMCV"-*.whl "$MMCV" <<'EOF'
import sys, zipfile
src = sys.argv[1]
dst = f'.whl/mmcv-{sys.argv[2]}-py3-none-any.whl'
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(
        dst, 'w', zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        name = item.filename
        if name.startswith('mmcv/_ext'):
            continue
        data = zin.read(name)
        if name.endswith('.dist-info/WHEEL'):
            data = data.replace(b'Root-Is-Purelib: false',
                                b'Root-Is-Purelib: true')
            data = b''.join(b'Tag: py3-none-any\n' if line.startswith(
                b'Tag:') else line for line in data.splitlines(True))
        elif name.endswith('.dist-info/RECORD'):
            data = b''.join(line for line in data.splitlines(True)
                            if not line.startswith(b'mmcv/_ext'))
        zout.writestr(item, data)
print('wrote', dst)
EOF
  ls -la .whl
  exit 0
fi

OUT_DIR=${1:-${OUT:-results/gpu_check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
SITE=/tmp/hawq-site
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
WHEELS=${WHEELS:-.whl}
ls "$WHEELS"/*.whl >/dev/null 2>&1 || {
  echo "error: no wheels in .whl/: run 'release/gpu_check.sh wheels' on a" \
       "machine with the package registries, and carry .whl along" >&2
  exit 2; }
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$PWD"
if ! $PY -c 'import mmcv._ext' 2>/dev/null; then
  cat > "$SITE/mmcv/_ext.py" <<'EOF'
"""Stand-in for mmcv's compiled ops on a machine without them (written by
release/gpu_check.sh): every op raises, as in an mmcv built without CUDA."""


def __getattr__(name):
    def missing(*args, **kwargs):
        raise RuntimeError(f'{name}: mmcv was built without compiled ops')
    return missing
EOF
fi

{
  date -u
  nvidia-smi -L || true
  $PY - <<'EOF'
import mmcv, mmdet, mmengine, torch
print('python', __import__('sys').version.split()[0], 'torch', torch.__version__,
      'cuda', torch.version.cuda, 'mmcv', mmcv.__version__, 'mmdet',
      mmdet.__version__, 'mmengine', mmengine.__version__)
EOF
  git log -1 --format='commit %H %s' 2>/dev/null || true
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

[ -f data/shapes/annotations/instances_val.json ] || \
  $PY tools/make_shapes_dataset.py --out-dir data/shapes > /dev/null

if [ -n "${REHEARSE:-}" ]; then
  GPU=cpu
  BENCH=(--device cpu --height 320 --width 448 --repeats 1 --step-images 2
         --step-samples 2 --trace-samples 2 --no-profile)
else
  GPU=cuda BENCH=(--repeats 3)
fi
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to OUT_DIR
  local name=$1 limit=$(( $2 * ${TIME_SCALE:-1} )); shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  if timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start)) s"
  else
    echo "   FAILED (exit $?) after $((SECONDS - start)) s"; status=1
  fi
  tail -n 25 "$OUT_DIR/$name.log"
}


# the main job on the GPU on the shipped small models: the demo (float,
# uniform, Out Sen Quant), Loss Sen through deformable attention (Hutchinson,
# capped at 32 images and 10 samples to fit), Out Sen Float/Quant, GPTQ,
# W8A8 with per-site sensitivity, and mmdet's own test.py; the summaries go
# to one log, the CPU's figures are in the README and docs/ (docs/gpu.md,
# docs/results.md)
ptq_runs() {
  local failed=0 log=/tmp/hawq-gpu/run.log
  mkdir -p /tmp/hawq-gpu
  show() {  # show CMD...: run it, keep the lines that matter; on a
    # failure the end of its output
    "$@" > "$log" 2>&1 || { echo "FAILED (exit $?)"; failed=1;
                           tail -n 15 "$log"; }
    grep -E 'sensitivity .*: sample' "$log" | tail -n 1
    grep -E "not available on|activation sensitivity:|activations: " "$log"
    grep -E 'coco/bbox_mAP:|bbox mAP|^warning' "$log" | tail -n 6
  }
  run_ptq() {
    echo "### tools/ptq.py configs/$1.py ${*:2}"
    show $PY tools/ptq.py "configs/$1.py" \
      --work-dir "/tmp/hawq-gpu/${1##*/}" "${@:2}"
  }
  run_ptq detr/detr_tiny_shapes_outquant_5bit --float --uniform-baseline
  run_ptq dino/dino_tiny_shapes_losssen_4bit --cfg-options \
    custom_hooks.0.calibration.num_images=32 \
    custom_hooks.0.sensitivity.max_samples=10
  run_ptq dino/dino_tiny_shapes_outquant_4bit
  run_ptq deformable_detr/deformable_detr_tiny_shapes_outquant_4bit --uniform-baseline
  run_ptq detr/detr_tiny_shapes_outquant_4bit_gptq
  run_ptq detr/detr_tiny_shapes_w8a8
  echo "### mmdet tools/test.py configs/deformable_detr/deformable_detr_tiny_shapes_outfloat_4bit.py"
  show $PY "$($PY -c 'import mmdet, os; print(os.path.join(os.path.dirname(mmdet.__file__), ".mim", "tools"))')/test.py" \
    configs/deformable_detr/deformable_detr_tiny_shapes_outfloat_4bit.py \
    checkpoints/deformable_detr_tiny_shapes.pth --work-dir /tmp/hawq-gpu/test_py
  return $failed
}
export PY
export -f ptq_runs

step cuda_tests 150 $PY -m pytest -v -n 8 -m cuda -p no:cacheprovider \
  --gpu-device $GPU --durations=12 -W ignore::DeprecationWarning tests
step benchmark_gpu 110 $PY benchmarks/benchmark_gpu.py "${BENCH[@]}" \
  --out "$OUT_DIR/benchmark_gpu.json"
step benchmark_bilinear 25 $PY benchmarks/benchmark_bilinear.py --device $GPU \
  --repeats 10
step ptq 140 bash -c ptq_runs
exit $status
