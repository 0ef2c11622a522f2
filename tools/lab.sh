#!/bin/bash
# Run one shell script inside "the lab": a QEMU TCG guest (L1) with a genuine kvm_amd and
# nested SVM, booted from build/guest (tools/build-guest.sh). See ENVIRONMENT.md.
#
# Usage: tools/lab.sh [options] SCRIPT
#   --file SRC:DST     put SRC at DST in the guest (repeatable)
#   --bin PROGRAM      put a host program and its shared libraries in the guest (repeatable)
#   --drive FILE       raw disk image as a virtio-blk device: /dev/vda, /dev/vdb, ... in order
#   --cpus N           guest CPUs (default 2)
#   --mem MIB          guest memory (default 2048)
#   --timeout SECONDS  wall-clock limit for the whole run (default 600)
#   --append ARGS      extra kernel command line arguments
#   --pidfile FILE     write QEMU's PID to FILE (to kill the whole lab from the host, as a power
#                      cut: drives then hold what L1 wrote to them, not what sits in L1's caches)
# SCRIPT runs as /lab/run.sh under busybox sh. The console streams to stdout; if stdin is a
# terminal, it is the console's input.
# Exit status: the script's, taken from the guest's "NVMM-EXIT N" line; if that line never
# comes, 124 (timeout) or 125 (anything else), with a "lab: no exit status: ..." line on stderr.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

fail() { echo "lab: no exit status: $*" >&2; exit 125; }
usage() { sed -n '5,/^set /{/^#/p}' "$0" >&2; fail "bad usage${1:+: $1}"; }

extra=() drives=() cpus=2 mem=2048 timeout=600 append= pidfile=
while [ $# -gt 0 ]; do
    case "$1" in
        --file)    [ $# -ge 2 ] || usage "$1 needs a value"; extra+=("$2"); shift 2 ;;
        --bin)     [ $# -ge 2 ] || usage "$1 needs a value"; extra+=(--bin "$2"); shift 2 ;;
        --drive)   [ $# -ge 2 ] || usage "$1 needs a value"; drives+=("$2"); shift 2 ;;
        --cpus)    [ $# -ge 2 ] || usage "$1 needs a value"; cpus="$2"; shift 2 ;;
        --mem)     [ $# -ge 2 ] || usage "$1 needs a value"; mem="$2"; shift 2 ;;
        --timeout) [ $# -ge 2 ] || usage "$1 needs a value"; timeout="$2"; shift 2 ;;
        --append)  [ $# -ge 2 ] || usage "$1 needs a value"; append="$2"; shift 2 ;;
        --pidfile) [ $# -ge 2 ] || usage "$1 needs a value"; pidfile="$2"; shift 2 ;;
        -h|--help) usage ;;
        --)        shift; break ;;
        -*)        usage "unknown option $1" ;;
        *)         break ;;
    esac
done
[ $# -eq 1 ] || usage "expected one SCRIPT"
script="$1"
[ -f "$script" ] || fail "no such script: $script"

for f in bzImage initramfs.cpio; do
    [ -f "$GUEST_DIR/$f" ] || fail "$GUEST_DIR/$f is missing: run tools/build-guest.sh"
done
# e2fsprogs and iproute2: tests make disk images and put ip/debugfs in the guest.
ensure_pkgs qemu-system-x86 cpio e2fsprogs iproute2 >/dev/null || fail "cannot install QEMU"

# The guest calibrates its TSC against the PIT; under TCG on a loaded machine that fails, the guest
# falls back to jiffies, and the KVM it hosts then stalls its own guests at boot. QEMU's TCG TSC
# ticks at the host's rate, so tell the guest that rate and skip the calibration.
tsc_khz="$(awk '/^cpu MHz/ {print int($4 * 1000); exit}' /proc/cpuinfo)"
tsc="${tsc_khz:+tsc_early_khz=$tsc_khz tsc=reliable}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# initrd = base initramfs + an archive with this run's files. Each archive must start on a
# 4-byte boundary; GNU cpio pads to 512 bytes, but pad anyway in case the base was gzipped.
"$REPO_ROOT/tools/mkcpio.sh" "$tmp/extra.cpio" "${extra[@]}" "$script:/lab/run.sh" \
    || fail "could not build the extra archive"
cp "$GUEST_DIR/initramfs.cpio" "$tmp/initrd"
truncate -s "%4" "$tmp/initrd"
cat "$tmp/extra.cpio" >> "$tmp/initrd"

qemu=(qemu-system-x86_64 -M microvm,acpi=off -accel tcg,thread=multi -cpu EPYC,+svm,+npt
      -smp "$cpus" -m "$mem" -nographic -no-reboot -nic none
      -kernel "$GUEST_DIR/bzImage" -initrd "$tmp/initrd"
      -append "console=ttyS0 reboot=t panic=-1 acpi=off $tsc nvmm.run=/lab/run.sh $append")
[ -z "$pidfile" ] || qemu+=(-pidfile "$pidfile")
# Drives use QEMU's default cache (writeback): what L1 writes goes to the host's page cache at once,
# and a flush from L1 becomes an fdatasync. The host's page cache survives QEMU's death, so after a
# kill the image holds exactly what L1 had written out, and none of what was still in L1's own
# page cache.
i=0
for d in "${drives[@]}"; do
    [ -f "$d" ] || [ -b "$d" ] || fail "no such drive image: $d"
    qemu+=(-drive "file=$d,format=raw,if=none,id=d$i" -device "virtio-blk-device,drive=d$i")
    i=$((i + 1))
done

# A terminal on stdin becomes the guest console's input (for interactive use, e.g. via
# tools/run.sh; Ctrl-A x quits QEMU); otherwise QEMU gets /dev/null and leaves stdin alone.
# --foreground keeps QEMU in our process group, so terminal signals reach it.
[ -t 0 ] || exec < /dev/null
set +e
timeout --foreground -k 10 "$timeout" "${qemu[@]}" | tee "$tmp/console"
rc=${PIPESTATUS[0]}
set -e

if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "lab: no exit status: timed out after ${timeout}s" >&2; exit 124
fi
# The last NVMM-EXIT line is L1's own (output of nested guests comes earlier), unless
# L1 panicked after it.
# (NULs removed first: a guest may write any byte to its console, and awk is for text.)
status="$(tr -d '\000' < "$tmp/console" | awk '
    /NVMM-EXIT [0-9]+/ { match($0, /NVMM-EXIT [0-9]+/); s = substr($0, RSTART + 10, RLENGTH - 10); panic = "" }
    /Kernel panic - not syncing/ { panic = $0 }
    END { if (s != "" && panic == "") print s }')"
if [ -z "$status" ]; then
    reason="$(grep -a 'Kernel panic - not syncing' "$tmp/console" | tail -n 1 | tr -d '\r' || true)"
    fail "QEMU exited with status $rc without an NVMM-EXIT line${reason:+ ($reason)}"
fi
exit "$status"
