#!/usr/bin/env bash
# The GPU check in one command (benchmarks/README.md): benchmarks/gpu_check.py with its
# arguments (--only PART[,PART], --device cpu --quick, ...). On a machine without lipexp's
# dependencies it installs them from ./wheelhouse (made beforehand by `make wheelhouse` and
# carried there) into /tmp/lipexp-site. PYTHON: the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled PYTHONUNBUFFERED=1  # never the network; output as it comes
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
