#!/usr/bin/env bash
# Runs the Python client against a freshly started server (used by .ci/run):
# a venv with grpcio, the server on free loopback ports with a temporary data
# dir, the example with --check, then a clean shutdown.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${ORDERTRAIL_BIN:-$root/target/debug/ordertrail}"
work="$(mktemp -d)"
venv="${ORDERTRAIL_PY_VENV:-$root/target/python-venv}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"

read -r http_port grpc_port < <("$venv/bin/python" - <<'PY'
import socket
ports = []
for _ in range(2):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); ports.append(s.getsockname()[1]); s.close()
print(*ports)
PY
)

ORDERTRAIL_DATA_DIR="$work/data" ORDERTRAIL_HTTP_ADDR="127.0.0.1:$http_port" \
ORDERTRAIL_GRPC_ADDR="127.0.0.1:$grpc_port" ORDERTRAIL_ADMIN_ADDR="127.0.0.1:0" RUST_LOG=warn \
  "$bin" serve >"$work/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true; rm -rf "$work"' EXIT

for _ in $(seq 1 300); do
  if "$venv/bin/python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$http_port/readyz', timeout=1)" 2>/dev/null; then
    break
  fi
  if ! kill -0 $server 2>/dev/null; then cat "$work/server.log"; exit 1; fi
  sleep 0.1
done

"$venv/bin/python" "$here/ordertrail_example.py" --http "127.0.0.1:$http_port" --grpc "127.0.0.1:$grpc_port" --check
