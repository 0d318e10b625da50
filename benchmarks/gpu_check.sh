#!/usr/bin/env bash
# The GPU check on a lent machine that has no network: installs what `make gpu-bundle` put in
# .gpu-bundle/ under /tmp (never into the machine's own Python or /), then runs
# benchmarks/gpu_check.py with the machine's python3 and its own PyTorch. Arguments go to
# gpu_check.py (--dry-run, --parts, --budget PART=S); tables go to $OUT.
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-bundle"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=${GPU_BUNDLE:-.gpu-bundle}
python=${PYTHON:-python3}
stage=${TMPDIR:-/tmp}/glad-gpu-check
if [[ ! -d $bundle/wheels ]]; then
    echo "gpu_check.sh: no $bundle/wheels: run 'make gpu-bundle' on a networked machine" \
        "and carry $bundle" >&2
    exit 2
fi
started=$SECONDS
rm -rf "$stage"
mkdir -p "$stage/bin"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$stage/site" "$bundle"/wheels/*.whl
for deb in "$bundle"/debs/*.deb; do
    dpkg-deb -x "$deb" "$stage/root"
done
# redis-server from Debian's package, with the libraries it links beside it.
cat >"$stage/bin/redis-server" <<WRAPPER
#!/bin/sh
LD_LIBRARY_PATH="$stage/root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" \
    exec "$stage/root/usr/bin/redis-server" "\$@"
WRAPPER
chmod +x "$stage/bin/redis-server"
"$stage/bin/redis-server" --version
export PATH="$stage/bin:$PATH"
export PYTHONPATH="$PWD:$stage/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
echo "gpu_check.sh: bundle installed in $((SECONDS - started)) s"
exec "$python" -m benchmarks.gpu_check --data "$bundle/data" "$@"
