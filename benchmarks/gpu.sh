#!/usr/bin/env bash
# Runs benchmarks/gpu.py on a machine without a package registry: installs the wheels in $WHEELS (default
# .whl/ in the repository root: diffusers, ml_collections, importlib_metadata) into a private folder, then
# runs gpu.py with the arguments given, e.g.  bash benchmarks/gpu.sh --out "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --find-links "$wheels" --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/cxr_ldm_site "$wheels"/*.whl
  export PYTHONPATH=/tmp/cxr_ldm_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu.py "$@"
