#!/usr/bin/env bash
# A real Kubernetes API server for CustomResourceDefinitions on loopback:
# apiextensions-apiserver (the CRD half of kube-apiserver: real schema
# validation, defaulting, status subresource, watch, resourceVersion; no core
# kinds such as ConfigMap or Namespace) with etcd, both built from Debian sid
# packages, since no prebuilt Kubernetes server can be fetched here.
#
#   scripts/k8s-apiserver.sh build   download the .debs (cached) and build the server
#   scripts/k8s-apiserver.sh start   build if needed, start etcd + server, write a kubeconfig
#   scripts/k8s-apiserver.sh check   start if needed; install the CRD, create every
#                                    site's EdgePipeline, expect bad ones refused,
#                                    patch a status (tests/k8s/apiserver_check.py)
#   scripts/k8s-apiserver.sh test    check, then the edge agent following an EdgePipeline
#                                    on this server (tests/tests/k8s_pipeline.rs: real
#                                    edge-agent, Mosquitto, cloud-ingest); stops the
#                                    server afterwards if it started it
#   scripts/k8s-apiserver.sh stop    stop what start started
#
# Exit status: 0 passed; 3 the server could not be had (sid packages could not be
# downloaded, or no dpkg-deb) - nothing was tested, which is NOT a pass;
# anything else: a failure.
#
# The kubeconfig (admin: a client certificate with O=system:masters) is
# written to $RUN/kubeconfig; `start` prints it. Cache: $EDGEFLEET_APISERVER_CACHE
# (~/.cache/edgefleet-apiserver), about 300 MB of .debs and 1.5 GB unpacked.
# sid moves: a build that worked can break when its packages change.
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${EDGEFLEET_APISERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgefleet-apiserver}
RUN=${EDGEFLEET_APISERVER_RUN:-$CACHE/run}
ETCD_PORT=${EDGEFLEET_ETCD_PORT:-23790}
API_PORT=${EDGEFLEET_APISERVER_PORT:-26443}
BIN=$CACHE/bin/apiextensions-apiserver
UNPACKED=$CACHE/root

say() { printf '==> %s\n' "$*"; }
fail() {
    printf 'k8s-apiserver: %s\n' "$*" >&2
    exit 1
}
# The server cannot be had here: say so loudly, exit 3 (callers decide
# whether that may pass; scripts/test.sh does not, unless told).
unavailable() {
    {
        printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n'
        printf '!!! k8s-apiserver: NO API SERVER, NOTHING TESTED: %s\n' "$*"
        printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n'
    } >&2
    exit 3
}
timed() { # timed LABEL COMMAND...
    local start=$SECONDS
    "${@:2}"
    printf '    %s: %ds\n' "$1" $((SECONDS - start))
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# apt pointed at sid through files of our own, so the system's sources,
# lists and package state are left alone.
apt_options() {
    local apt=$CACHE/apt
    echo "-o Dir::Etc::SourceList=$apt/sources.list -o Dir::Etc::SourceParts=$apt/empty" \
        "-o Dir::State::Lists=$apt/lists -o Dir::Cache=$apt/cache" \
        "-o Dir::State::status=/var/lib/dpkg/status -o Debug::NoLocking=1" \
        "-o APT::Sandbox::User=$(id -un)"
}

mirror() {
    local uri
    uri=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
    [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list 2>/dev/null)
    echo "${uri:-http://deb.debian.org/debian}"
}

download() {
    local apt=$CACHE/apt
    mkdir -p "$apt/empty" "$apt/lists/partial" "$apt/cache/archives/partial" "$CACHE/debs"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(mirror) sid main" >"$apt/sources.list"
    # shellcheck disable=SC2046
    apt-get $(apt_options) update -qq || return 1
    local go_package packages
    # The Go toolchain sid builds its Go packages with, e.g. golang-1.26-go.
    # shellcheck disable=SC2046
    go_package=$(apt-cache $(apt_options) depends golang-go | sed -n 's/.*Depends: \(golang-1\.[0-9]*-go\)$/\1/p' | head -n1)
    [ -n "$go_package" ] || { echo "cannot find sid's Go toolchain package" >&2; return 1; }
    # shellcheck disable=SC2046
    packages=$(apt-cache $(apt_options) depends --recurse --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances \
        golang-k8s-apiextensions-apiserver-dev | grep -E '^golang-[a-z0-9.+-]*-dev$' | sort -u)
    echo "    $(wc -w <<<"$packages") Go source packages, $go_package, etcd-server"
    # shellcheck disable=SC2046,SC2086
    (cd "$CACHE/debs" && apt-get $(apt_options) download -qq $packages "$go_package" \
        "${go_package%-go}-src" etcd-server) || return 1
    # Only a complete download counts: a partial one is fetched again.
    touch "$CACHE/debs/.complete"
}

unpack() {
    rm -rf "$UNPACKED"
    mkdir -p "$UNPACKED"
    local deb
    for deb in "$CACHE"/debs/*.deb; do
        dpkg-deb -x "$deb" "$UNPACKED"
    done
}

compile() {
    local goroot
    goroot=$(find "$UNPACKED/usr/lib" -maxdepth 1 -name 'go-1.*' | sort -V | tail -n1)
    [ -d "$goroot" ] || fail "no Go toolchain unpacked"
    mkdir -p "$(dirname "$BIN")" "$CACHE/gocache"
    # GOPATH mode over Debian's source tree: every dependency is one of the
    # unpacked golang-*-dev packages, no module download.
    GOROOT=$goroot GOPATH=$UNPACKED/usr/share/gocode GO111MODULE=off CGO_ENABLED=0 \
        GOTOOLCHAIN=local GOCACHE=$CACHE/gocache GOFLAGS= \
        "$goroot/bin/go" build -o "$BIN" k8s.io/apiextensions-apiserver
}

build() {
    # Built before (the server and the unpacked etcd): nothing to fetch.
    if [ -x "$BIN" ] && [ -n "$(find "$UNPACKED/usr/bin" -name etcd -type f 2>/dev/null)" ]; then
        return
    fi
    command -v dpkg-deb >/dev/null || unavailable "needs dpkg-deb (Debian)"
    if [ ! -f "$CACHE/debs/.complete" ]; then
        say "download sid packages"
        timed download download || unavailable "cannot download Debian sid's packages for apiextensions-apiserver and etcd (network or mirror)"
        rm -rf "$UNPACKED"
    fi
    if [ ! -d "$UNPACKED/usr/share/gocode" ]; then
        say "unpack"
        timed unpack unpack
    fi
    if [ ! -x "$BIN" ]; then
        say "build apiextensions-apiserver"
        timed build compile
    fi
}

pki() {
    local d=$RUN/pki
    [ -f "$d/admin.crt" ] && return
    command -v openssl >/dev/null || as_root apt-get install -y -qq openssl >/dev/null
    mkdir -p "$d"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj "/CN=edgefleet test CA" -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
        -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
        -days 30 -out "$d/server.crt" \
        -extfile <(printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n') 2>/dev/null
    # system:masters is authorized for everything, without any RBAC objects.
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/O=system:masters/CN=edgefleet-admin" \
        -keyout "$d/admin.key" -out "$d/admin.csr" 2>/dev/null
    openssl x509 -req -in "$d/admin.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
        -days 30 -out "$d/admin.crt" -extfile <(printf 'extendedKeyUsage=clientAuth\n') 2>/dev/null
}

running() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

start() {
    build
    mkdir -p "$RUN"
    pki
    local etcd
    etcd=$(find "$UNPACKED/usr/bin" -name etcd -type f | head -n1)
    [ -x "$etcd" ] || fail "no etcd unpacked"
    if ! running etcd; then
        say "start etcd on 127.0.0.1:$ETCD_PORT"
        "$etcd" --data-dir "$RUN/etcd" --name edgefleet-test \
            --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
            --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
            --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 10))" \
            --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 10))" \
            --initial-cluster "edgefleet-test=http://127.0.0.1:$((ETCD_PORT + 10))" \
            >"$RUN/etcd.log" 2>&1 &
        echo $! >"$RUN/etcd.pid"
    fi
    # The server insists on kubeconfigs for delegated authn/authz; an
    # unreachable one plus --authentication-skip-lookup leaves it to the
    # client CA, and system:masters passes authorization.
    cat >"$RUN/unreachable.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: none, user: {}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
EOF
    if ! running apiserver; then
        say "start apiextensions-apiserver on 127.0.0.1:$API_PORT"
        "$BIN" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
            --secure-port "$API_PORT" --bind-address 127.0.0.1 \
            --tls-cert-file "$RUN/pki/server.crt" --tls-private-key-file "$RUN/pki/server.key" \
            --client-ca-file "$RUN/pki/ca.crt" \
            --kubeconfig "$RUN/unreachable.kubeconfig" \
            --authentication-kubeconfig "$RUN/unreachable.kubeconfig" \
            --authorization-kubeconfig "$RUN/unreachable.kubeconfig" \
            --authentication-skip-lookup \
            --disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionPolicy,MutatingAdmissionWebhook,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook \
            >"$RUN/apiserver.log" 2>&1 &
        echo $! >"$RUN/apiserver.pid"
    fi
    cat >"$RUN/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: edgefleet-test
    cluster:
      server: https://127.0.0.1:$API_PORT
      certificate-authority: $RUN/pki/ca.crt
users:
  - name: admin
    user:
      client-certificate: $RUN/pki/admin.crt
      client-key: $RUN/pki/admin.key
contexts:
  - name: edgefleet-test
    context: {cluster: edgefleet-test, user: admin}
current-context: edgefleet-test
EOF
    local tries=0
    # informer-sync never passes here: it waits for informers of kinds this
    # server does not serve (API priority and fairness objects).
    until curl -sf --cacert "$RUN/pki/ca.crt" --cert "$RUN/pki/admin.crt" --key "$RUN/pki/admin.key" \
        "https://127.0.0.1:$API_PORT/readyz?exclude=informer-sync" >/dev/null; do
        tries=$((tries + 1))
        if [ $tries -gt 120 ] || ! running apiserver; then
            tail -n 30 "$RUN/apiserver.log" >&2
            fail "the API server did not become ready"
        fi
        sleep 0.5
    done
    say "ready: export KUBECONFIG=$RUN/kubeconfig"
}

# check, then the agent's pipeline test; stops the server if it was not running.
test_pipeline() {
    local was_running=
    running apiserver && was_running=1
    [ -n "$was_running" ] || trap stop EXIT
    check
    say "edge-agent following an EdgePipeline (tests/tests/k8s_pipeline.rs)"
    local start=$SECONDS
    # The test runs these as processes. --workspace, as scripts/test.sh builds
    # (a no-op then); selecting packages would resolve other features and
    # rebuild much of the workspace.
    (cd "$ROOT_DIR" && cargo build --locked -q --workspace --bins) \
        || fail "cannot build the binaries the test runs"
    (cd "$ROOT_DIR" && EDGEFLEET_TEST_KUBECONFIG=$RUN/kubeconfig EDGEFLEET_K8S_REQUIRED=1 \
        cargo test --locked -q --workspace --test k8s_pipeline -- --nocapture) \
        || fail "the edge agent's EdgePipeline test failed"
    printf '    k8s_pipeline: %ds\n' $((SECONDS - start))
    say "the edge agent follows its EdgePipeline on a real API server"
}

stop() {
    local name
    for name in apiserver etcd; do
        if running "$name"; then
            kill "$(cat "$RUN/$name.pid")"
        fi
        rm -f "$RUN/$name.pid"
    done
}

check() {
    start
    local venv=${EDGEFLEET_K8S_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/edgefleet-k8s}/venv
    # PyYAML comes with the venv scripts/check-k8s.sh installs.
    [ -x "$venv/bin/python" ] || fail "run scripts/check-k8s.sh once first (it makes $venv)"
    say "CRD and sites through the API server"
    "$venv/bin/python" "$ROOT_DIR/tests/k8s/apiserver_check.py" \
        "https://127.0.0.1:$API_PORT" "$RUN/pki" "$ROOT_DIR" || fail "API server checks failed"
    say "all API server checks passed"
}

case ${1:-} in
build) build ;;
start) start ;;
check) check ;;
test) test_pipeline ;;
stop) stop ;;
*) fail "usage: $0 build|start|check|test|stop" ;;
esac
