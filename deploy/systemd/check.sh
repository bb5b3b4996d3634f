#!/usr/bin/env bash
# CI check of deploy/systemd/edge-agent.service:
#   1. the hardening and layout the install docs promise are all there;
#   2. `systemd-analyze verify` accepts it without a single warning (it
#      exits 0 on unknown keys, so any output counts as failure);
#   3. `systemd-analyze security --offline` rates it at most 2.5 ("OK").
# verify insists that ExecStart binaries exist, so it runs on a temporary
# copy whose /usr/local/bin/edge-agent points at a stub.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
unit=$here/edge-agent.service
MAX_EXPOSURE=2.5

command -v systemd-analyze >/dev/null 2>&1 \
  || { echo "systemd-analyze missing: apt-get install systemd (cross/setup.sh does)" >&2; exit 1; }

echo "==> required settings in $unit"
required=(
  "DynamicUser=yes"
  "StateDirectory=edgefleet"
  "ConfigurationDirectory=edgefleet"
  "LoadCredential=agent.key:/etc/edgefleet/tls/agent.key"
  "ExecStartPre=/usr/local/bin/edge-agent check-config /etc/edgefleet/agent.yaml"
  "ExecStart=/usr/local/bin/edge-agent run --config /etc/edgefleet/agent.yaml"
  "ProtectSystem=strict"
  "ProtectHome=yes"
  "PrivateTmp=yes"
  "NoNewPrivileges=yes"
  "CapabilityBoundingSet="
  "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_CAN AF_NETLINK"
  "SystemCallFilter=@system-service"
  "Restart=on-failure"
)
missing=0
for line in "${required[@]}"; do
  grep -qxF "$line" "$unit" || { echo "missing: $line" >&2; missing=1; }
done
grep -qE '^MemoryMax=[0-9]+[KMG]?$' "$unit" || { echo "missing: MemoryMax=<size>" >&2; missing=1; }
grep -qE '^RestartSec=[0-9]+' "$unit" || { echo "missing: RestartSec=" >&2; missing=1; }
# The agent flushes its buffer and waits for in-flight acks on SIGTERM.
stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\?$/\1/p' "$unit")
{ [ -n "$stop" ] && [ "$stop" -ge 30 ]; } || { echo "TimeoutStopSec must be >= 30 s to let the agent flush" >&2; missing=1; }
[ "$missing" -eq 0 ] || exit 1
echo "ok"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '#!/bin/sh\nexit 0\n' >"$tmp/edge-agent"
chmod +x "$tmp/edge-agent"
sed "s#/usr/local/bin/edge-agent#$tmp/edge-agent#g" "$unit" >"$tmp/edge-agent.service"

echo "==> systemd-analyze verify ($(systemd-analyze --version | head -n1))"
if ! out=$(systemd-analyze verify "$tmp/edge-agent.service" 2>&1) || [ -n "$out" ]; then
  printf '%s\n' "${out:-systemd-analyze verify failed}" | sed "s#$tmp/##g" >&2
  exit 1
fi
echo "ok"

echo "==> systemd-analyze security --offline (exposure must be <= $MAX_EXPOSURE)"
threshold=${MAX_EXPOSURE/./}   # systemd takes the 0..100 scale
if ! out=$(systemd-analyze security --offline=yes --threshold="$threshold" "$tmp/edge-agent.service" 2>&1); then
  printf '%s\n' "$out" | grep -E '^✗|Overall' >&2 || printf '%s\n' "$out" >&2
  exit 1
fi
printf '%s\n' "$out" | grep 'Overall exposure'
echo "systemd unit check passed"
