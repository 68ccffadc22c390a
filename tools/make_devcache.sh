#!/usr/bin/env bash
# Fills .devcache/ (git-ignored), which GPU runs carry because the GPU machine has no package registry:
# the CUTLASS headers (from the nvidia-cutlass wheel) and the wheels of Python packages it lacks.
#   tools/make_devcache.sh && <device run with carry [".devcache"]> tools/device_check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .devcache/wheels
python3 -m pip show nvidia-cutlass >/dev/null 2>&1 || python3 -m pip install -q nvidia-cutlass==4.2.0.0
inc=$(python3 -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")
tar czf .devcache/cutlass_include.tgz -C "$inc" .
# diffusers and the two small packages it needs that the GPU image lacks (it has transformers etc.).
python3 -m pip download -q --no-deps -d .devcache/wheels diffusers==0.42.1 importlib_metadata lazy_importer
du -sh .devcache
