#!/bin/bash
# Builds nvmm as one static binary, so the same file runs on the host, in the lab guest (L1) and
# in the guests nvmm boots (L2, L3), none of which carry a C library.
# Prints the binary's path on stdout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target=x86_64-unknown-linux-gnu
# glibc's static archive comes with libc6-dev; cargo's gcc linker needs it for crt-static.
if [ ! -f /usr/lib/x86_64-linux-gnu/libc.a ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libc6-dev >&2
fi
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros, which cannot be static.
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --manifest-path "$root/Cargo.toml" --release --target "$target" -p nvmm >&2
echo "$root/target/$target/release/nvmm"
