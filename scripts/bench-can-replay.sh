#!/usr/bin/env bash
# CAN benchmark of the agent: CPU and memory while it replays a candump log
# of a saturated 1 Mbit/s bus at 8x recorded speed (about 64k frames/s),
# decoding every frame with the example DBC (33 messages, multiplexed ones
# among them), no reduction, into the durable buffer and over mTLS to a
# cloud-ingest with its embedded store. Results: BENCHMARKS.md, "CAN replay".
#
#   scripts/bench-can-replay.sh [--seconds 60] [--speed 8]
#
# Uses release binaries (builds them unless EDGEFLEET_BIN_DIR points at a
# directory holding edge-agent, cloud-ingest, edgefleet and cansim).
# Prints one JSON object on stdout. Never pass/fail on speed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECONDS_RECORDED=60
SPEED=8
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_RECORDED=$2; shift 2 ;;
        --speed) SPEED=$2; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
if [ -z "${EDGEFLEET_BIN_DIR:-}" ]; then
    (cd "$ROOT" && cargo build --release --locked -p edge-agent -p cloud-ingest -p edgefleet -p edgefleet-cansim \
        --bin edge-agent --bin cloud-ingest --bin edgefleet --bin cansim) >&2
    EDGEFLEET_BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
BIN=$EDGEFLEET_BIN_DIR
DBC=$ROOT/crates/can/testdata/vehicle.dbc
WORK=$(mktemp -d "${TMPDIR:-/tmp}/edgefleet-can-bench.XXXXXX")
cleanup() {
    [ -n "${AGENT:-}" ] && kill "$AGENT" 2>/dev/null || true
    [ -n "${INGEST:-}" ] && kill "$INGEST" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# A saturated 1 Mbit/s bus of 8-byte classic frames carries about 8,000
# frames/s (about 125 bits per frame with stuffing): every one of the DBC's
# 33 messages every 4 ms is 8,250 frames/s.
periods=()
for m in $(grep -o '^BO_ [0-9]* [A-Za-z0-9_]*' "$DBC" | cut -d' ' -f3); do periods+=(--period "$m=4ms"); done
"$BIN/cansim" --dbc "$DBC" --output "$WORK/bus.log" --duration "${SECONDS_RECORDED}s" "${periods[@]}" >/dev/null
frames=$(wc -l < "$WORK/bus.log")
echo "log: $frames frames over ${SECONDS_RECORDED} s recorded; replaying at ${SPEED}x" >&2

"$BIN/edgefleet" certs init "$WORK/pki" --agents 1 >/dev/null
# A free port below the ephemeral range, where no outgoing connection can
# take it before the server binds it (as edgefleet_tests::free_port).
port() { python3 -c '
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
while True:
    p = random.randrange(10000, low)
    s = socket.socket()
    try: s.bind(("127.0.0.1", p)); print(p); break
    except OSError: pass'; }
INGEST_PORT=$(port)
METRICS_PORT=$(port)
cat > "$WORK/agent.yaml" <<EOF
agent:
  id: agent-001
  dataDir: $WORK/agent
sources:
  candumpReplay:
    - file: $WORK/bus.log
      source: can0
      dbc: [$DBC]
      speed: $SPEED
uplink:
  endpoint: https://127.0.0.1:$INGEST_PORT
  serverName: localhost
  caFile: $WORK/pki/ca.pem
  certFile: $WORK/pki/agents/agent-001.pem
  keyFile: $WORK/pki/agents/agent-001.key
metrics:
  listen: 127.0.0.1:$METRICS_PORT
EOF
"$BIN/cloud-ingest" serve --listen "127.0.0.1:$INGEST_PORT" --cert "$WORK/pki/ingest.pem" \
    --key "$WORK/pki/ingest.key" --client-ca "$WORK/pki/ca.pem" --store "$WORK/store" \
    >"$WORK/ingest.log" 2>&1 &
INGEST=$!
sleep 1
start_ns=$(date +%s%N)
RUST_LOG=warn "$BIN/edge-agent" run --config "$WORK/agent.yaml" >"$WORK/agent.log" 2>&1 &
AGENT=$!

metric() { curl -s "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null | awk -v m="$1" '$1 == m { print $2 }'; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# Replay time at this speed, then until every frame is acknowledged.
deadline=$(( $(date +%s) + SECONDS_RECORDED / SPEED + 120 ))
replayed_at=""
while :; do
    sleep 0.2
    n=$(metric 'edge_records_in_total{source="can0"}')
    if [ -z "$replayed_at" ] && [ "${n:-0}" = "$frames" ]; then
        replayed_at=$(date +%s%N)
        replay_ticks=$(cpu_ticks "$AGENT")
    fi
    acked=$(metric edge_records_out_total)
    [ "${acked:-0}" = "$frames" ] && break
    [ "$(date +%s)" -lt "$deadline" ] || { echo "timed out: $n of $frames frames taken in, ${acked:-0} acknowledged" >&2; tail "$WORK/agent.log" >&2; exit 1; }
done
done_ns=$(date +%s%N)
hz=$(getconf CLK_TCK)
total_ticks=$(cpu_ticks "$AGENT")
hwm_kib=$(awk '/VmHWM/ { print $2 }' "/proc/$AGENT/status")
ingest_ticks=$(cpu_ticks "$INGEST")
dropped=$(metric 'edge_dropped_records_total{reason="can_socket_overflow"}')
python3 - "$frames" "$SPEED" "$SECONDS_RECORDED" "$start_ns" "$replayed_at" "$done_ns" \
    "$replay_ticks" "$total_ticks" "$ingest_ticks" "$hz" "$hwm_kib" <<'PY'
import json, os, sys
frames, speed, recorded, start, replayed, done, rticks, tticks, iticks, hz, hwm = sys.argv[1:]
frames, speed, recorded, hz = int(frames), float(speed), float(recorded), int(hz)
replay_s = (int(replayed) - int(start)) / 1e9
total_s = (int(done) - int(start)) / 1e9
print(json.dumps({
    "scenario": "can-replay",
    "frames": frames,
    "target_frames_per_s": round(frames / recorded * speed),
    "achieved_frames_per_s": round(frames / replay_s),
    "replay_s": round(replay_s, 2),
    "all_acknowledged_s": round(total_s, 2),
    "agent_cpu_s": round(int(tticks) / hz, 2),
    "agent_cpu_cores_while_replaying": round(int(rticks) / hz / replay_s, 3),
    "agent_cpu_us_per_frame": round(int(tticks) / hz / frames * 1e6, 2),
    "agent_peak_rss_mib": round(int(hwm) / 1024, 1),
    "ingest_cpu_s": round(int(iticks) / hz, 2),
    "cores": os.cpu_count(),
    "loadavg_1m": os.getloadavg()[0],
}))
PY
