#!/usr/bin/env bash
# Submit a gradworks command as a Ray job: cluster/submit.sh run data_diet --set seeds=3
# Address: RAY_API_SERVER_ADDRESS (default http://127.0.0.1:8265, e.g. through `ray dashboard`).
# Inside the job, gradworks attaches to the cluster through RAY_ADDRESS instead of starting Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
exec ray job submit --address "${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}" \
    --runtime-env cluster/runtime_env.yaml -- gradworks "$@"
