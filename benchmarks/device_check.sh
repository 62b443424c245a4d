#!/usr/bin/env bash
# The GPU checks of the device-clean / half-precision work, as one script for a lent GPU machine.
# Run there through the shared recipe (../shared/gpu/README.md), e.g. `bash .gpu-b/run.sh 'bash benchmarks/device_check.sh'`.
# Everything is written to $OUT as it goes (tee), so a run stopped by its time limit still brings back what it did.
# Budget: about 1 min for the quick-mode notebooks, 1 min for memory per precision, 2 min for the step benchmark.
set -u
OUT=${OUT:-/tmp/device-check}; mkdir -p "$OUT"
W=${GPU_WORK:-$HOME/gpu-work}; mkdir -p "$W/build"
log="$OUT/device_check.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"

echo "== every notebook, quick mode, on the GPU (device-clean check)" | tee -a "$log"
PEFT_LAB_QUICK=1 timeout 300 python3 -m peft_lab.run_notebooks --out "$W/build" notebooks/0*.ipynb 2>&1 \
  | grep -v Warning | tee -a "$log"

echo "== memory breakdown per precision (6 steps each)" | tee -a "$log"
timeout 150 python3 - <<'PY' 2>&1 | grep -v Warning | tee -a "$log"
import os
from peft_lab import data, lora, measure, models, train
task = data.load_task("reviews")
for prec in ("fp32", "bf16", "fp16"):
    os.environ[models.PRECISION_ENV] = prec
    base, tok = models.load()
    for name, tuned in (("full", models.fresh_copy(base)),
                        ("lora r8 q,v", lora.apply(models.frozen_copy(base), rank=8, targets=["q_proj", "v_proj"]))):
        run = train.fit(tuned, tok, task, steps=6, lr=2e-5 if name == "full" else 2e-4, log=False, progress=False)
        t = measure.memory_table(run)
        print(f"{prec} {name:<12} " + ", ".join(f"{k} {v:,.1f}" for k, v in t.items()) + f" | {run.seconds_per_step:.3f} s/step")
        del tuned
PY

echo "== step benchmark" | tee -a "$log"
timeout 200 python3 benchmarks/gpu_step.py --steps 10 --batches 8 32 128 2>&1 | grep -v Warning | tee -a "$log"
tar czf "$OUT/build.tgz" -C "$W" build 2>/dev/null
