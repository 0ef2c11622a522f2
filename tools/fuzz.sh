#!/bin/bash
# Builds the cargo-fuzz targets in fuzz/ (virtio-blk requests, virtio-net RX and TX and repeated RX
# refills, the virtio-mmio transport in front of a device) and runs each
# one briefly. A crash, a leak, a timeout or a failed build fails the script. Fuzzing needs the
# nightly toolchain: without it this script fails, it never skips.
#
# Usage: tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   SECONDS_PER_TARGET  default 20 (or $FUZZ_SECONDS)
#   TARGET              default: every target `cargo fuzz list` prints
# The corpus grows in fuzz/corpus/TARGET and crashing inputs land in fuzz/artifacts/TARGET
# (both git-ignored); reproduce one with `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/FILE`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

seconds="${1:-${FUZZ_SECONDS:-20}}"
[ $# -gt 0 ] && shift
case "$seconds" in
    ''|*[!0-9]*) echo "fuzz.sh: SECONDS_PER_TARGET must be a number, got '$seconds'" >&2; exit 2 ;;
esac

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: FAIL: the nightly Rust toolchain is missing (cargo-fuzz needs it):" \
         "rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked >&2
fi

cd "$REPO_ROOT/fuzz"
# The fuzz crate is its own workspace with its own target directory; a CARGO_TARGET_DIR meant for
# the main workspace would mix sanitizer builds into it.
unset CARGO_TARGET_DIR
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
[ ${#targets[@]} -gt 0 ] || { echo "fuzz.sh: FAIL: no fuzz targets found" >&2; exit 1; }

start=$SECONDS
# Builds every target (with ASan, cargo-fuzz's default), so a build error fails here, by name.
cargo +nightly fuzz build >&2

for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    # seeds/TARGET (committed): inputs that once failed, replayed first on every run.
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    echo "fuzz.sh: $t for ${seconds}s" >&2
    # -rss_limit_mb and -timeout: a request that eats memory or hangs counts as a failure.
    if ! cargo +nightly fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
            -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
            > "corpus/$t.log" 2>&1; then
        tail -n 60 "corpus/$t.log" >&2
        echo "fuzz.sh: FAIL: $t (log above; inputs in fuzz/artifacts/$t)" >&2
        exit 1
    fi
    runs="$(awk '/stat::number_of_executed_units/ { print $2 }' "corpus/$t.log")"
    echo "fuzz.sh: $t: ${runs:-?} inputs, no failure" >&2
    [ -n "$runs" ] && [ "$runs" -gt 0 ] || { echo "fuzz.sh: FAIL: $t ran no input" >&2; exit 1; }
done
echo "fuzz.sh: ${#targets[@]} targets passed in $((SECONDS - start)) s"
