#!/bin/bash
# Boot time to the guest's first userspace line (NVMM-USERSPACE, printed by /init), nvmm against
# QEMU's microvm, both run as the VMM inside the same lab guest (L1) on the same KVM, with the same
# kernel, initramfs, memory and vCPU count. Runs alternate between the two; medians of N each.
# Also reports nvmm's own memory (peak RSS minus guest RAM touched), which nvmm logs at exit.
#
# Usage: tools/bench-boot.sh [RUNS]   (default 10)
# Timings come from L1's /proc/uptime (10 ms steps), read by the same shell loop for both VMMs.
# TCG inflates absolute numbers; the ratio is what this measures.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
runs="${1:-10}"
"$REPO_ROOT/tools/build-guest.sh" >&2
nvmm="$("$REPO_ROOT/tools/build-nvmm.sh")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# L2 does nothing but reach userspace and reboot.
echo 'exit 0' > "$tmp/guest.sh"
"$REPO_ROOT/tools/mkcpio.sh" "$tmp/extra.cpio" "$tmp/guest.sh:/lab/run.sh"
cat "$GUEST_DIR/initramfs.cpio" "$tmp/extra.cpio" > "$tmp/l2.cpio"

cat > "$tmp/l1.sh" <<SCRIPT
cmdline="console=ttyS0 panic=1 quiet nvmm.run=/lab/run.sh"
# Prints the seconds (uptime, 10 ms steps) from its start to the marker on stdin; drains the rest.
time_to_marker() {
    seen=
    while IFS= read -r line; do
        case "\$line" in
            *NVMM-USERSPACE*) [ -z "\$seen" ] && seen=\$(cut -d' ' -f1 /proc/uptime) ;;
            *"nvmm's own"*) echo "MEM \${line##*nvmm\\'s own }" ;;
        esac
    done
    echo "\$seen"
}
for i in \$(seq $runs); do
    t0=\$(cut -d' ' -f1 /proc/uptime)
    out=\$(/lab/nvmm --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 256M --cmdline "\$cmdline reboot=k" --log-level info 2>&1 | time_to_marker)
    echo "\$out" | grep MEM | sed 's/^/BENCH-/'
    echo "BENCH-BOOT nvmm \$t0 \$(echo "\$out" | tail -n1)"
    t0=\$(cut -d' ' -f1 /proc/uptime)
    t1=\$(qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -smp 1 -m 256 -nographic -no-reboot \
        -kernel /lab/bzImage -initrd /lab/l2.cpio -append "\$cmdline reboot=t" 2>&1 | time_to_marker | tail -n1)
    echo "BENCH-BOOT qemu \$t0 \$t1"
done
SCRIPT

qemu_files=()
for f in qboot.rom bios-microvm.bin linuxboot_dma.bin pvh.bin; do
    qemu_files+=(--file "/usr/share/qemu/$f:/usr/share/qemu/$f")
done
"$REPO_ROOT/tools/lab.sh" --append quiet --timeout $((120 + 60 * runs)) \
    --bin /usr/bin/qemu-system-x86_64 "${qemu_files[@]}" \
    --file "$nvmm:/lab/nvmm" --file "$GUEST_DIR/bzImage:/lab/bzImage" --file "$tmp/l2.cpio:/lab/l2.cpio" \
    "$tmp/l1.sh" | tee "$tmp/console.log" | grep --line-buffered '^BENCH-' >&2 || true

python3 - "$tmp/console.log" <<'PY'
import re, statistics, sys
boot = {"nvmm": [], "qemu": []}
mem = []
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"BENCH-BOOT (\w+) ([\d.]+) ([\d.]+)", line.strip())
    if m:
        boot[m.group(1)].append((float(m.group(3)) - float(m.group(2))) * 1000)
    m = re.match(r"BENCH-MEM (\d+) KiB", line.strip())
    if m:
        mem.append(int(m.group(1)))
if not boot["nvmm"] or not boot["qemu"]:
    sys.exit("bench-boot: no complete runs (see the console above)")
n, q = statistics.median(boot["nvmm"]), statistics.median(boot["qemu"])
print(f"boot to userspace marker, median of {len(boot['nvmm'])} (nvmm) / {len(boot['qemu'])} (qemu) runs, in the lab (L1 VMM, TCG-inflated):")
print(f"  nvmm           {n:8.0f} ms   (min {min(boot['nvmm']):.0f}, max {max(boot['nvmm']):.0f})")
print(f"  qemu microvm   {q:8.0f} ms   (min {min(boot['qemu']):.0f}, max {max(boot['qemu']):.0f})")
print(f"  nvmm/qemu      {n / q:8.2f}")
if mem:
    print(f"nvmm's own memory (peak RSS - guest RAM touched): median {statistics.median(mem) / 1024:.2f} MiB, max {max(mem) / 1024:.2f} MiB")
PY
