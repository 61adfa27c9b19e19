#!/usr/bin/env bash
# The real pipeline on a GPU (benchmarks/gpu_pipeline.py says what each check does): the whole
# `loraflow run` on a ~1B random Llama (QLoRA bf16, auto attention, paged 8-bit AdamW, vLLM or
# `transformers serve` eval, verified merge), ZeRO-2 and ZeRO-3 train stages, and 8B-shape
# throughput with torch.compile through the Trainer and through benchmarks/gpu_train.py.
#
#   bash benchmarks/gpu_pipeline.sh             # CUDA GPU, at most 9 minutes on an H200
#   bash benchmarks/gpu_pipeline.sh --dry-run   # the same steps on the tiny model, CPU, 1-2 minutes on 2 cores
#
# Results: $OUT/gpu_pipeline.json and $OUT/gpu_pipeline.log (OUT defaults to a new temp dir); the
# last line on stdout is one JSON object. Set PYTHON to choose the interpreter (default .venv/bin/python,
# else python3). On a machine without network (the lent H200), wheels carried in .whl/ are installed
# into a venv over the image's packages first: see benchmarks/RESULTS.md for the list.
set -u
cd "$(dirname "$0")/.."
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; fi
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-pipeline-out.XXXXXX")}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [ "$DRY_RUN" = 1 ]; then
  # Hard limit above the dry run's own budget (240 s): a hang still ends with a JSON line.
  timeout -s TERM -k 20 280 "$PYTHON" -m benchmarks.gpu_pipeline --dry-run --out "$OUT"
  exit $?
fi

if [ -d .whl ]; then
  # A venv that sees the image's torch, with the carried wheels in it: console scripts such as
  # `transformers` land next to its python, where the eval stage starts them from.
  VENV=${GPU_PIPELINE_VENV:-/tmp/gpu-pipeline-venv}
  python3 -m venv --system-site-packages "$VENV" || exit 1
  "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
  PYTHON="$VENV/bin/python"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1
# 9 minutes in all (the venv above takes seconds): the driver ends its checks by 480 s, the JSON by 505 s.
timeout -s TERM -k 15 505 "$PYTHON" -m benchmarks.gpu_pipeline --out "$OUT" --budget-s 480
