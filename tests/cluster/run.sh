#!/usr/bin/env bash
# Cluster tests: start a single-node SLURM cluster, run tests/cluster with it, stop it.
# Skipped (exit 0, with the reason) where the machine cannot host one: not root, or no apt mirror.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [ "$(id -u)" != 0 ]; then echo "cluster tests skipped: not root (SLURM daemons need root)"; exit 0; fi
if ! command -v slurmctld >/dev/null && ! timeout 120 apt-get update -qq >/dev/null 2>&1; then
  echo "cluster tests skipped: no reachable Debian mirror to install slurm-wlm"; exit 0
fi
state=$(tests/cluster/slurm.sh up) || { echo "cluster tests: SLURM did not start"; exit 1; }
trap 'tests/cluster/slurm.sh down' EXIT
MOELANG_SLURM_STATE="$state" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  .venv/bin/python -m pytest -q tests/cluster
