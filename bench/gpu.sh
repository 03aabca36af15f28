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
# a server's own decode step: transformers eager, the span eager, the span through CUDA graphs (bit-identical?)
timeout 150 python3 bench/decode_graphs.py 2>&1 | tee "$OUT/decode_graphs.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_decode_graphs.py > "$OUT/decode_graphs_tests.txt" 2>&1
tail -4 "$OUT/decode_graphs_tests.txt"
# the 7B-shaped model: servers in bfloat16 on the GPU, the client in its default dtype, against local transformers;
# servers with their defaults (CUDA graphs) and eager (--decode-path plain), in the same run
timeout ${BENCH_TIMEOUT:-330} python3 bench/swarm_generate.py --model 7b --servers 1 2 --device cuda --dtype bfloat16 \
    --new-tokens 64 --repeats 5 --variant eager="--decode-path plain" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/swarm_generate_7b.txt"
# every client x server dtype pair, servers and client on the GPU (the wire-contract issue's tests; the first ones fit)
timeout ${DTYPES_TIMEOUT:-90} python3 -m pytest -q -x -p no:cacheprovider --tb=short tests/test_dtypes.py > "$OUT/dtypes.txt" 2>&1
tail -4 "$OUT/dtypes.txt"
