#!/usr/bin/env bash
# One command from a fresh Debian machine to a running hangar: installs what is missing,
# builds, starts `hangar server` on the embedded default (SQLite, data in
# $XDG_DATA_HOME/hangar), provisions the demo service http-static and prints its address.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --locked
bin=$PWD/target/release/hangar
# The server makes its files private (umask 077); so is the log this script opens for it.
umask 077
# As root, QEMU runs as the unprivileged user hangar-vm, which must reach the data dir
# (it cannot enter /root): the default is then /var/lib/hangar, as `hangar` has it.
if [ "$(id -u)" -eq 0 ]; then default_data_home=/var/lib; else default_data_home=$HOME/.local/share; fi
data_dir=${HANGAR_DATA_DIR:-${XDG_DATA_HOME:-$default_data_home}/hangar}
mkdir -p "$data_dir"
url=${HANGAR_URL:-http://127.0.0.1:7070}
export HANGAR_URL=$url

if ! curl -fsS "$url/healthz" >/dev/null 2>&1; then
    echo "starting hangar server (log: $data_dir/server.log)" >&2
    setsid "$bin" server --data-dir "$data_dir" --listen "${url#http://}" \
        >>"$data_dir/server.log" 2>&1 </dev/null &
    echo $! >"$data_dir/server.pid"
    for _ in $(seq 1 600); do
        curl -fsS "$url/healthz" >/dev/null 2>&1 && break
        if ! kill -0 "$(cat "$data_dir/server.pid")" 2>/dev/null; then
            echo "hangar server failed to start:" >&2
            tail -n 20 "$data_dir/server.log" >&2
            exit 1
        fi
        sleep 0.5
    done
fi

"$bin" services
echo
echo "waiting for the warm pool to hold a booted, paused http-static VM..." >&2
for _ in $(seq 1 240); do
    "$bin" pools --json | grep -A8 '"name": "http-static"' | grep -q '"ready": [1-9]' && break
    sleep 0.5
done
"$bin" pools
start=$(date +%s%N)
endpoint=$("$bin" request http-static)
ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo
echo "http-static is served by a QEMU VM at: $endpoint   (request answered in $ms ms)"
echo
curl -fsS "http://$endpoint/"
echo
"$bin" vms
cat <<MSG

Web console: $url/   (sign in with the admin token: $data_dir/admin.token)
Try:   export PATH=$PWD/target/release:\$PATH
       hangar request http-counter && hangar vms && hangar rm VM
Stop:  kill \$(cat $data_dir/server.pid)   (VMs and their endpoints keep running; the next start adopts them)
       kill \$(cat $data_dir/forwarder.pid)  (then the endpoints close too)
MSG
