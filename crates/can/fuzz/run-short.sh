#!/usr/bin/env bash
# Short fuzzing run for CI: about 50 s of fuzzing in total, plus build time.
#
# With a nightly toolchain: installs cargo-fuzz if missing and runs each
# libFuzzer target for FUZZ_SECONDS (default 25 s each), with debug
# assertions and overflow checks on, starting from seeds/ and the test DBC.
#
# Without nightly (a fresh machine here may not be able to install one): runs
# the same target bodies (src/lib.rs) as plain stable tests over the seeds
# plus a bounded number of pseudo-random mutations. That fallback has no
# coverage guidance: it catches panics on malformed input, not deep bugs.
set -euo pipefail
FUZZ_DIR="$(cd "$(dirname "$0")" && pwd)"
CRATE_DIR="$(dirname "$FUZZ_DIR")"
SECS="${FUZZ_SECONDS:-25}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FUZZ_DIR/target}"

have_nightly() { rustup run nightly rustc --version >/dev/null 2>&1; }

if ! have_nightly && command -v rustup >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal >/dev/null 2>&1 || true
fi

if have_nightly; then
    if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
        cargo install cargo-fuzz --locked
    fi
    for target in candump_parse dbc_decode; do
        corpus="$CARGO_TARGET_DIR/fuzz-corpus/$target"
        mkdir -p "$corpus"
        if [ "$target" = candump_parse ]; then
            cp "$FUZZ_DIR"/seeds/candump/* "$corpus"/
        else
            cp "$FUZZ_DIR"/seeds/dbc_decode/* "$corpus"/
            { cat "$CRATE_DIR/testdata/vehicle.dbc"; printf '\0\x40\x1f\x7d\xfa\x64\x4b\x22\x5a'; } \
                > "$corpus/vehicle.bin"
        fi
        echo "== fuzzing $target for ${SECS}s"
        (cd "$CRATE_DIR" && cargo +nightly fuzz run --fuzz-dir "$FUZZ_DIR" \
            --sanitizer none --debug-assertions "$target" "$corpus" -- \
            -max_total_time="$SECS" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1)
    done
else
    echo "== nightly unavailable: running the fuzz bodies as stable tests (bounded random inputs)"
    (cd "$FUZZ_DIR" && cargo test --release --no-default-features --lib)
fi
