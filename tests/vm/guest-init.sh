#!/bin/sh
# /init of the CAN test VM (busybox sh). Runs the whole test inside the guest:
# real SocketCAN (vcan), the real edge-agent and cloud-ingest binaries over
# mTLS on loopback, cansim as the devices, cansim-check as the judge.
# Prints exactly one of EDGEFLEET-VM-CAN-TEST: PASS / FAIL <reason> and powers off.
# run-can-tests.sh (on the host) reads that marker from the console.

export PATH=/bin:/sbin:/usr/bin
export RUST_LOG=${RUST_LOG:-info}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /tmp && mount -t tmpfs -o size=200m tmpfs /tmp

finish() {
    echo "EDGEFLEET-VM-CAN-TEST: $*"
    sync
    poweroff -f
    sleep 10
}

fail() {
    echo "---- agent log (tail) ----"; tail -n 40 /tmp/agent.log 2>/dev/null
    echo "---- ingest log (tail) ----"; tail -n 20 /tmp/ingest.log 2>/dev/null
    finish "FAIL $*"
}

step() { echo "== $(cut -d' ' -f1 /proc/uptime)s $*"; }

step "loading CAN modules"
for m in can can-raw can-dev vcan; do
    insmod /lib/can/$m.ko || fail "insmod $m"
done
ip link set lo up || fail "lo up"
for i in vcan0 vcan1; do
    ip link add dev $i type vcan || fail "creating $i"
    ip link set $i up || fail "$i up"
done

step "edge-agent decode on a cansim log"
cansim --dbc /etc/edgefleet/test.dbc --output /tmp/sim.log --log-interface can0 --count 500 >/tmp/sim-log.json || fail "cansim --output"
decoded=$(edge-agent decode --dbc /etc/edgefleet/test.dbc /tmp/sim.log 2>/tmp/decode.err | grep -c '"message": ')
[ "$decoded" = 500 ] || fail "edge-agent decode printed $decoded of 500 frames: $(tail -n 3 /tmp/decode.err)"
# Line 15 of test.dbc is a signal: break it; the error must name file and line.
sed '15s/.*/ SG_ Broken oops/' /etc/edgefleet/test.dbc >/tmp/bad.dbc
edge-agent decode --dbc /tmp/bad.dbc /tmp/sim.log >/dev/null 2>/tmp/bad.err
rc=$?
[ $rc = 2 ] && grep -q '/tmp/bad.dbc:15:' /tmp/bad.err || fail "bad DBC: exit $rc, stderr: $(cat /tmp/bad.err)"

# The development PKI (/etc/edgefleet/pki) was made on the host by run-can-tests.sh.
[ -s /etc/edgefleet/pki/agents/agent-001.pem ] || fail "no PKI in the initramfs"

step "starting cloud-ingest and edge-agent"
cloud-ingest serve --listen 127.0.0.1:7443 --metrics-listen 127.0.0.1:9465 \
    --cert /etc/edgefleet/pki/ingest.pem --key /etc/edgefleet/pki/ingest.key --client-ca /etc/edgefleet/pki/ca.pem \
    --store /tmp/store >/tmp/ingest.log 2>&1 &
INGEST=$!
edge-agent run --config /etc/edgefleet/agent.yaml >/tmp/agent.log 2>&1 &
AGENT=$!

# Ready when both sources are up: source_up is set once the CAN socket is bound.
ready=0
for _ in $(seq 1 100); do
    m=$(wget -q -O - http://127.0.0.1:9464/metrics 2>/dev/null)
    if echo "$m" | grep -q 'edge_source_up{source="vcan0"} 1' &&
       echo "$m" | grep -q 'edge_source_up{source="vcan1"} 1' &&
       echo "$m" | grep -q '^edge_uplink_connected 1'; then
        ready=1; break
    fi
    sleep 0.2
done
[ $ready = 1 ] || fail "agent not ready (CAN sources up and uplink connected) in 20 s"

SIM="cansim --dbc /etc/edgefleet/test.dbc --counter Seq"

step "phase 1: vcan0 3 s; vcan1 runs through all phases (kernel filter drops Body)"
$SIM --interface vcan1 --seed 11 --duration 9s >/tmp/sent-vcan1.json 2>/tmp/sim-vcan1.err &
SIM1=$!
$SIM --interface vcan0 --seed 1 --duration 3s >/tmp/sent-vcan0-a.json 2>/tmp/sim-a.err || fail "cansim phase 1"

step "phase 2: vcan0 down (sends must fail), then up again"
ip link set vcan0 down || fail "vcan0 down"
sleep 1
$SIM --interface vcan0 --seed 2 --duration 500ms >/tmp/sent-while-down.json 2>/dev/null
grep -q '"total_sent":0,' /tmp/sent-while-down.json || fail "frames were sent while vcan0 was down: $(cat /tmp/sent-while-down.json)"
# source_up follows the interface: the agent reads the link flags each second.
metric_within() { # metric_within PATTERN SECONDS
    for _ in $(seq 1 $(( $2 * 5 ))); do
        wget -q -O - http://127.0.0.1:9464/metrics | grep -q "$1" && return 0
        sleep 0.2
    done
    return 1
}
metric_within 'edge_source_up{source="vcan0"} 0' 3 || fail "the agent did not report vcan0 down"
ip link set vcan0 up || fail "vcan0 up"
metric_within 'edge_source_up{source="vcan0"} 1' 3 || fail "the agent did not report vcan0 up again"

step "phase 3: vcan0 3 s more after the interface came back"
$SIM --interface vcan0 --seed 3 --duration 3s >/tmp/sent-vcan0-b.json 2>/tmp/sim-b.err || fail "cansim phase 3"
wait $SIM1 || fail "cansim on vcan1"

step "waiting for the agent to deliver everything"
sleep 1
drained=0
for _ in $(seq 1 150); do
    if wget -q -O - http://127.0.0.1:9464/metrics | grep -q '^edge_buffer_records 0$'; then
        drained=1; break
    fi
    sleep 0.2
done
[ $drained = 1 ] || fail "agent buffer not drained in 30 s"
wget -q -O - http://127.0.0.1:9464/metrics | grep -E '^edge_(can_|dropped|records_in|source_reconnects)' | sed 's/^/metric: /'

step "stopping agent and ingest"
kill -TERM $AGENT; wait $AGENT; echo "edge-agent exit $?"
kill -TERM $INGEST; wait $INGEST; echo "cloud-ingest exit $?"

cloud-ingest query --store /tmp/store >/tmp/records.jsonl || fail "cloud-ingest query"
for f in /tmp/sent-*.json; do echo "sent: $(basename $f): $(cat $f)"; done
cansim-check --records /tmp/records.jsonl \
    --sent /tmp/sent-vcan0-a.json --sent /tmp/sent-vcan0-b.json --sent /tmp/sent-vcan1.json \
    --absent vcan1/Body || fail "cansim-check"
grep -q '"source":"vcan1","device":"Body"' /tmp/records.jsonl && fail "filtered message stored"
finish PASS
