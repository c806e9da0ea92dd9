#!/usr/bin/env bash
# The README's "TLS and SuperNode authentication by hand" steps, exactly as printed there (the lines between
# the README markers below are that code block; tests/test_flower_by_hand.py runs this script and checks the
# README still holds them): a SuperLink over TLS with SuperNode authentication and three SuperNodes on
# 127.0.0.1, one `flwr run` of a fedrank config, and every process stopped again.
#
#   scripts/flower_by_hand.sh [WORK_DIR] CONFIG.toml   # WORK_DIR: new or empty; '' or omitted: a new temp dir
#
# Exit status 0 only when the run's status on the SuperLink is `finished:completed` (`flwr run` exits 0 even
# when the run failed). Needs bash (for `<(...)`), openssl, ssh-keygen, curl and fedrank with its Flower extra.
set -euo pipefail

if [[ $# -eq 1 ]]; then set -- "" "$1"; fi
if [[ $# -ne 2 || -z $2 ]]; then
    echo "usage: $0 [WORK_DIR] CONFIG.toml" >&2
    exit 2
fi
for tool in openssl ssh-keygen curl python; do
    if ! command -v "$tool" > /dev/null; then
        case $tool in
            ssh-keygen) hint="install OpenSSH's client (e.g. apt-get install openssh-client), or make each node key in \
Python: fedrank.flower.deploy.make_node_key(\"\$WORK/keys\", 'node0') writes the same ECDSA P-384 key pair" ;;
            *) hint="install it with your system's package manager" ;;
        esac
        echo "$0: $tool not found: $hint" >&2
        exit 2
    fi
done
CONFIG="$(realpath "$2")"
umask 077
WORK="$(realpath -m "${1:-$(mktemp -d -t fedrank-by-hand-XXXXXX)}")"

PIDS=()  # the processes started below; stop() ends them and everything they started, by pid

descendants() {  # every process below pid $1, found by parent id
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
        echo "$child"
        descendants "$child"
    done
}

alive() {  # pid $1 exists and is not a zombie
    local state
    state="$(ps -o stat= -p "$1" 2>/dev/null || true)"
    [[ -n $state && $state != Z* ]]
}

wait_gone() {  # wait up to $1 s until none of the pids after it is alive; print those still alive
    local deadline=$((SECONDS + $1)) pid left
    shift
    while :; do
        left=()
        for pid in "$@"; do alive "$pid" && left+=("$pid"); done
        if ((${#left[@]} == 0 || SECONDS >= deadline)); then break; fi
        sleep 0.5
    done
    echo "${left[@]}"
}

stop() {  # SIGTERM what we started, SuperNodes first; then any of their children left; SIGKILL as a last resort
    local rc=$? all=() tree=() left=() i
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        mapfile -t tree < <(echo "${PIDS[i]}"; descendants "${PIDS[i]}")  # while its parent still holds it
        all+=("${tree[@]}")
        kill -TERM "${PIDS[i]}" 2> /dev/null || true
        wait_gone 20 "${tree[@]}" > /dev/null
    done
    read -r -a left <<< "$(wait_gone 0 "${all[@]}")"
    if ((${#left[@]})); then
        echo "SIGTERM to ${#left[@]} processes that outlived their parents: ${left[*]}" >&2
        kill -TERM "${left[@]}" 2> /dev/null || true
        read -r -a left <<< "$(wait_gone 10 "${left[@]}")"
        if ((${#left[@]})); then kill -KILL "${left[@]}" 2> /dev/null || true; fi
    fi
    wait 2> /dev/null || true
    if ((rc != 0)) && [[ -d $WORK/logs ]]; then
        for log in "$WORK"/logs/*.log; do
            echo "--- $log (last lines)" >&2
            tail -n 20 "$log" >&2
        done
    fi
    echo "stopped ${#all[@]} processes; work directory: $WORK" >&2
    exit "$rc"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- README begin ---
# Set first: CONFIG, a fedrank TOML, and WORK, a new directory for the certificates, keys, FLWR_HOME, logs and
# the run (both absolute paths). Needs bash (`<(...)`), openssl, ssh-keygen, curl, fedrank with its Flower extra.
umask 077                                   # all of it owner-only
mkdir -p "$WORK/keys" "$WORK/logs" && cd "$WORK"
export FLWR_HOME="$WORK/flwr-home"          # Flower's connections, apps and logs (default: ~/.flwr)
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
# Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name: this Python's bin/ must be on
# PATH (an activated venv has it), or flower-superlink dies with FileNotFoundError 'flower-superexec'.
export PATH="$(dirname "$(python -c 'import sys;print(sys.executable)')"):$PATH"
export OMP_NUM_THREADS=1                    # one torch thread per process, as in `OMP_NUM_THREADS=1 fedrank run`:
                                            # needed for results bit-identical to the simulator's
# Four free ports on 127.0.0.1 (fixed ones do too, e.g. 8100 9194 9195 9196, but a port in use is a traceback):
PORTS="$(python -c 'from fedrank.flower.deploy import free_port as f; print(*(f() for _ in range(4)))')"
read -r LINK_PORT P0 P1 P2 <<< "$PORTS"
NODE_PORTS=("$P0" "$P1" "$P2")

# 1. A CA and a server certificate for 127.0.0.1 (the SAN must name the address the nodes dial):
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj "/CN=local CA" \
    -keyout ca.key -out ca.crt
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -out server.pem \
    -extfile <(printf "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\nextendedKeyUsage=serverAuth")

# 2. The connection `flwr` uses, in $FLWR_HOME/config.toml:
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "deploy-tls"

[superlink.deploy-tls]
address = "127.0.0.1:$LINK_PORT"
root-certificates = "$WORK/ca.crt"
EOF

# 3. The SuperLink, TLS + authentication (the database keeps the registered keys and node ids):
flower-superlink --host 127.0.0.1 --port "$LINK_PORT" --ssl-ca-certfile ca.crt --ssl-certfile server.pem \
    --ssl-keyfile server.key --enable-supernode-auth --database state.db \
    --disable-runtime-dependency-installation > logs/superlink.log 2>&1 &
PIDS+=($!)
for _ in $(seq 120); do  # up when GET /health answers (about 15 s on 2 busy cores)
    curl -fsS --cacert ca.crt "https://127.0.0.1:$LINK_PORT/health" > /dev/null 2>&1 && break
    sleep 0.5
done

# 4. One ECDSA key per SuperNode, registered before it starts; each node its own --port, partition and rank:
RANKS=(4 8 16)
for i in 0 1 2; do
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "node$i" -f "keys/node$i"
    flwr supernode register "keys/node$i.pub" deploy-tls --name "node$i"
    flower-supernode --superlink "127.0.0.1:$LINK_PORT" --root-certificates ca.crt \
        --auth-supernode-private-key "keys/node$i" --port "${NODE_PORTS[i]}" \
        --node-config "partition-id=$i num-partitions=3 rank=${RANKS[i]}" > "logs/node$i.log" 2>&1 &
    PIDS+=($!)
done

# 5. The app (a folder whose pyproject.toml names fedrank's apps), one run (the ServerApp waits up to run config
#    node-wait = 120 s for the nodes), and the run's final status:
python -m fedrank flower app "$WORK/app"
flwr run "$WORK/app" deploy-tls --stream --run-config "config=\"$CONFIG\" out-dir=\"$WORK/run\"" \
    2>&1 | tee logs/flwr-run.log
RUN_ID="$(sed -n 's/.*Successfully started run \([0-9]*\).*/\1/p' logs/flwr-run.log | head -n 1)"
STATUS="$(flwr ls deploy-tls --run-id "$RUN_ID" --format json |
    python -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])')"
echo "run $RUN_ID: $STATUS"
[[ $STATUS == finished:completed ]]         # `flwr run` exits 0 even when the run failed
# 6. Stop: kill the SuperNodes, then the SuperLink (this script's EXIT trap does, by pid, their children too)
# --- README end ---
