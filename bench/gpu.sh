#!/usr/bin/env bash
# The GPU measurements of bench/RESULTS.md, as run on a lent GPU machine that has PyTorch but no package index:
# the wheels of ../shared/gpu/wheels.sh travel in .whl/ (see its header). Writes its logs under $OUT if set.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
chmod +x /tmp/site/hivemind/hivemind_cli/p2pd
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# every client x server dtype pair, servers and client on the GPU (the wire-contract issue's tests; the first ones fit the time)
timeout 110 python3 -m pytest -q -x -p no:cacheprovider --tb=short tests/test_dtypes.py > "$OUT/dtypes.txt" 2>&1; tail -4 "$OUT/dtypes.txt"
# the 7B-shaped model: servers in bfloat16 on the GPU, the client in its default dtype, against local transformers
timeout ${BENCH_TIMEOUT:-330} python3 bench/swarm_generate.py --model 7b --servers 1 2 --device cuda --dtype bfloat16 \
    --new-tokens 64 --repeats 3 --variant hivemind=--no-direct ${BENCH_ARGS:-} 2>&1 | tee "$OUT/swarm_generate_7b.txt"
