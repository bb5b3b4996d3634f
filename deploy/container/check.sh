#!/usr/bin/env bash
# CI check of deploy/container/Containerfile without a container engine:
# parses it and checks sources, stages, user, final stage
# (check_containerfile.py says what exactly). Needs the binaries from
# cross/build.sh (both architectures) in target/dist/.
#
# Then makes sure the checker itself still catches the mistakes it is for,
# by running it on broken copies of the file.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
checker=$here/check_containerfile.py
file=$here/Containerfile

echo "==> checking $file"
python3 "$checker" "$file" "$root"

echo "==> the checker rejects broken variants"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# name | sed expression that breaks the file
cases=(
  "root user|s/^USER 65532:65532$/USER 0/"
  "named user|s/^USER 65532:65532$/USER edgefleet/"
  "shell in final stage|s|^USER 65532:65532$|RUN apt-get install -y curl\nUSER 65532:65532|"
  "missing binary|s|aarch64-unknown-linux-musl/cloud-ingest|aarch64-unknown-linux-musl/no-such-binary|"
  "wrong architecture|s|dist/aarch64-unknown-linux-musl/edge-agent|dist/x86_64-unknown-linux-musl/edge-agent|"
  "gateway agent (no kubernetes feature) in the image|s|aarch64-unknown-linux-musl/edge-agent-kubernetes|aarch64-unknown-linux-musl/edge-agent|"
  "no buffer volume|/^VOLUME/d"
  "shell-form entrypoint|s|^ENTRYPOINT .*|ENTRYPOINT /usr/local/bin/edge-agent run|"
)
failed=0
for case in "${cases[@]}"; do
  name=${case%%|*}
  expr=${case#*|}
  sed -e "$expr" "$file" >"$tmp/Containerfile"
  if cmp -s "$file" "$tmp/Containerfile"; then
    echo "self-test '$name': the sed expression changed nothing (Containerfile changed?)" >&2
    failed=1
  elif python3 "$checker" "$tmp/Containerfile" "$root" >/dev/null 2>"$tmp/err"; then
    echo "self-test '$name': checker accepted a broken Containerfile" >&2
    failed=1
  else
    echo "  rejected: $name ($(head -n1 "$tmp/err" | sed 's/^[^:]*: //'))"
  fi
done
[ "$failed" -eq 0 ] || exit 1
echo "container check passed"
