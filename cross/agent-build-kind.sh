#!/usr/bin/env bash
# Prints which build of edge-agent a binary is, by behaviour: `kubernetes`
# (built with the feature: `run --pipeline` looks for a cluster
# configuration) or `gateway` (without it: `run --pipeline` is refused).
# Both builds parse --pipeline, so --help cannot tell them apart. aarch64
# binaries run under qemu-aarch64-static. Exits 1, printing what the binary
# said, if it is neither.
#
#   cross/agent-build-kind.sh BINARY
#
# Used by cross/build.sh and deploy/container/check_containerfile.py.
set -euo pipefail
binary=${1:?usage: $0 BINARY}
run=()
if file -b "$binary" | grep -q 'ARM aarch64'; then run=(qemu-aarch64-static); fi
# No cluster configuration to be found: the kubernetes build fails at once.
said=$(env -u KUBERNETES_SERVICE_HOST KUBECONFIG=/nonexistent HOME=/nonexistent \
  timeout 60 "${run[@]}" "$binary" run --pipeline probe --node-name probe 2>&1 || true)
case "$said" in
  *"no Kubernetes client configuration"*) echo kubernetes ;;
  *"built without Kubernetes support"*) echo gateway ;;
  *)
    # shellcheck disable=SC2016 # the backquotes are literal
    printf '%s is neither build of edge-agent; `run --pipeline` said: %s\n' "$binary" "$said" >&2
    exit 1
    ;;
esac
