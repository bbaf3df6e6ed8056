#!/bin/sh
# Spark GPU discovery script that reports fake GPUs, for tests/test_gpu_executors.py on machines without
# any: the worker runs it (spark.worker.resource.gpu.discoveryScript) and hands the addresses to executors.
# Addresses: $FAKE_GPU_ADDRESSES, comma-separated (default "0,1"). Spark's real script prints nvidia-smi's
# indices in the same format: examples/src/main/scripts/getGpusResources.sh in a Spark distribution.
addresses=${FAKE_GPU_ADDRESSES:-0,1}
printf '{"name": "gpu", "addresses": ["%s"]}\n' "$(printf '%s' "$addresses" | sed 's/,/", "/g')"
