#!/usr/bin/env bash
# Leave-one-lab-out comparison of the wbc_type recipes, then the final three-lab training with
# the winner, on a GPU machine. Data comes packed by scripts/pack_subset.py into .gpudata/;
# torchstain travels as a wheel in .whl/. Results go to $OUT (rows, held-out logits, logs, and
# the exported final run to register with `python -m leuko register-run`).
set -uo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT" /tmp/lolo
python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi -L
started=$(date +%s)
for method in reinhard no-normalisation macenko reinhard+degrade reinhard+colour+degrade; do
  timeout "${LOLO_SECONDS:-330}" python3 -m leuko crosslab --config configs/wbc_type_lite0.yaml --data .gpudata \
    --methods "$method" --epochs "${LOLO_EPOCHS:-6}" --workers 3 --out "/tmp/lolo/$method" \
    > "/tmp/lolo/$method.log" 2>&1 &
done
wait
echo "leave-one-lab-out: $(( $(date +%s) - started )) s"
python3 -m leuko crosslab --config configs/wbc_type_lite0.yaml --data .gpudata --table --out /tmp/lolo \
  --then-train /tmp/final --workers 12 2>&1 | grep -v "it/s" | tee /tmp/lolo/final.log
echo "total: $(( $(date +%s) - started )) s"
tar czf "$OUT/lolo.tgz" -C /tmp/lolo --exclude runs .
cp /tmp/final/*.json /tmp/final/*.safetensors "$OUT/" 2>/dev/null
ls -la "$OUT"
