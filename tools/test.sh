#!/bin/bash
# The whole test suite, from a fresh Debian machine: installs packages, builds the guest kernel and
# initramfs (cached in build/), builds the static nvmm, then runs every test: unit tests, tests on
# this machine's /dev/kvm, the lab tests that boot real guests under QEMU's TCG with nested SVM,
# and a short run of each fuzz target.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"
start=$SECONDS
# What the tests use beyond the guest build: mkfs.ext4/debugfs, ip, unshare/setpriv, QEMU for the lab.
ensure_pkgs e2fsprogs iproute2 util-linux qemu-system-x86 cpio
tools/build-guest.sh
NVMM_BIN="$(tools/build-nvmm.sh)"
export NVMM_BIN
echo "test.sh: artifacts ready after $((SECONDS - start)) s" >&2
# The lab tests each run a 2-CPU QEMU: two at a time fill this 2-core machine.
cargo test --workspace -- --test-threads="${NVMM_TEST_THREADS:-2}" "$@"
tools/fuzz.sh
echo "test.sh: done in $((SECONDS - start)) s" >&2
