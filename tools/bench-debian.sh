#!/bin/bash
# Boot time of a stock Debian 12 guest (tools/build-debian.sh: Debian's cloud kernel and initramfs,
# systemd, root on virtio-blk, a virtio-net NIC) to multi-user.target, nvmm against QEMU's microvm
# with ACPI on, both run as the VMM inside the same lab guest (L1) on the same KVM, with the same
# kernel, initramfs, image, 2 vCPUs and 1 GiB. Runs alternate between the two.
#
# Usage: tools/bench-debian.sh [RUNS]   (default 3; a pair of boots takes about a minute, 5 runs about
# 5 minutes with the lab boot. On a machine loaded by other work the medians wander; the minimums
# held steady over two 5-run benches)
# Every run boots a fresh copy of the image: L1 reads the lab's /dev/vda (a copy of build/debian/
# root.img) once into a sparse file in its tmpfs, and copies that before each run. Times come from
# L1's /proc/uptime (10 ms steps): from the VMM's start to the guest's DEBIAN-MULTI-USER line
# (printed as soon as multi-user.target is reached), and to the VMM's exit after the guest's ACPI
# power-off. The guest's own `systemd-analyze` line is shown for every run.
# TCG inflates absolute numbers; the ratio is what this measures.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
runs="${1:-3}"
"$REPO_ROOT/tools/build-guest.sh" >&2
mapfile -t debian < <("$REPO_ROOT/tools/build-debian.sh")
[ "${#debian[@]}" = 3 ] || { echo "bench-debian: tools/build-debian.sh failed" >&2; exit 1; }
nvmm="$("$REPO_ROOT/tools/build-nvmm.sh")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The lab's drive: a private copy, so the cached image is never written.
cp --sparse=always "${debian[0]}" "$tmp/root.img"

mac=52:54:00:de:b1:12
cat > "$tmp/l1.sh" <<SCRIPT
IP=/usr/local/sbin/ip2
CP=/usr/local/bin/gnu-cp
cmdline="console=ttyS0 root=/dev/vda rw quiet panic=1"
mkdir -p /var/run/netns /run/netns
\$IP netns add debian || { echo BENCH-ERROR no network namespace; exit 1; }
\$IP -n debian tuntap add dev dtap0 mode tap || { echo BENCH-ERROR no TAP; exit 1; }
\$IP -n debian link set dtap0 up
\$CP --sparse=always /dev/vda /tmp/pristine.img || { echo BENCH-ERROR cannot copy /dev/vda; exit 1; }
echo "BENCH-IMAGE \$(du -k /tmp/pristine.img | cut -f1) KiB in L1's tmpfs"

# Reads a VMM's console on stdin; prints "<uptime at DEBIAN-MULTI-USER> <uptime at the end>"
# last, after the guest's systemd-analyze and failure lines.
watch_console() {
    seen=-
    while IFS= read -r line; do
        case "\$line" in
            *DEBIAN-MULTI-USER*) [ "\$seen" = - ] && seen=\$(cut -d' ' -f1 /proc/uptime) ;;
            *DEBIAN-ANALYZE:*"Startup finished"*) echo "ANALYZE \${line#*DEBIAN-ANALYZE: }" ;;
            *DEBIAN-CPUS=*|*DEBIAN-VDA=*|*DEBIAN-ACPI-ERRORS=*|*DEBIAN-SYSTEM-STATE=*) echo "INFO \${line#*DEBIAN-}" ;;
        esac
    done
    echo "\$seen \$(cut -d' ' -f1 /proc/uptime)"
}
# report VMM T0 OUTPUT STATUS
report() {
    echo "\$3" | grep '^ANALYZE ' | sed "s/^ANALYZE /BENCH-ANALYZE \$1 /"
    echo "BENCH-INFO \$1 \$(echo "\$3" | grep '^INFO ' | cut -c6- | tr '\n' ' ')"
    echo "BENCH-BOOT \$1 \$2 \$(echo "\$3" | tail -n 1) \$4"
}
for i in \$(seq $runs); do
    \$CP --sparse=always /tmp/pristine.img /tmp/run.img
    t0=\$(cut -d' ' -f1 /proc/uptime)
    out=\$( { \$IP netns exec debian timeout -s KILL 600 /lab/nvmm --cpus 2 --mem 1G \
        --kernel /lab/vmlinuz --initrd /lab/initrd.img --disk path=/tmp/run.img --net tap=dtap0,mac=$mac \
        --cmdline "\$cmdline reboot=k" </dev/null 2>&1; echo "EXIT \$?"; } | tee /tmp/nvmm.log | watch_console)
    report nvmm \$t0 "\$out" "\$(grep -a '^EXIT ' /tmp/nvmm.log | tail -n 1 | cut -d' ' -f2)"
    grep -aq DEBIAN-DONE /tmp/nvmm.log || tail -n 60 /tmp/nvmm.log | sed 's/^/BENCH-NVMM-CONSOLE /'

    \$CP --sparse=always /tmp/pristine.img /tmp/run.img
    t0=\$(cut -d' ' -f1 /proc/uptime)
    out=\$( { \$IP netns exec debian timeout -s KILL 600 qemu-system-x86_64 -M microvm,acpi=on -accel kvm \
        -cpu host -smp 2 -m 1024 -nographic -no-reboot \
        -kernel /lab/vmlinuz -initrd /lab/initrd.img -append "\$cmdline reboot=t" \
        -drive file=/tmp/run.img,format=raw,if=none,id=d0 -device virtio-blk-device,drive=d0 \
        -netdev tap,id=n0,ifname=dtap0,script=no,downscript=no -device virtio-net-device,netdev=n0,mac=$mac \
        </dev/null 2>&1; echo "EXIT \$?"; } | tee /tmp/qemu.log | watch_console)
    report qemu \$t0 "\$out" "\$(grep -a '^EXIT ' /tmp/qemu.log | tail -n 1 | cut -d' ' -f2)"
    grep -aq DEBIAN-DONE /tmp/qemu.log || tail -n 60 /tmp/qemu.log | sed 's/^/BENCH-QEMU-CONSOLE /'
done
SCRIPT

qemu_files=()
for f in bios-microvm.bin linuxboot_dma.bin pvh.bin; do
    qemu_files+=(--file "/usr/share/qemu/$f:/usr/share/qemu/$f")
done
"$REPO_ROOT/tools/lab.sh" --append quiet --mem 3072 --timeout $((600 + 1200 * runs)) \
    --bin /usr/bin/qemu-system-x86_64 "${qemu_files[@]}" --bin /sbin/ip:/usr/local/sbin/ip2 \
    --bin /bin/cp:/usr/local/bin/gnu-cp --drive "$tmp/root.img" \
    --file "$nvmm:/lab/nvmm" --file "${debian[1]}:/lab/vmlinuz" --file "${debian[2]}:/lab/initrd.img" \
    "$tmp/l1.sh" | tee "$tmp/console.log" | grep --line-buffered -a '^BENCH-' >&2 || true

python3 - "$tmp/console.log" <<'PY'
import re, statistics, sys
boot = {"nvmm": [], "qemu": []}
total = {"nvmm": [], "qemu": []}
failed = {"nvmm": 0, "qemu": 0}
analyze = {"nvmm": [], "qemu": []}
for line in open(sys.argv[1], errors="replace"):
    line = line.strip()
    m = re.match(r"BENCH-BOOT (\w+) ([\d.]+) ([\d.]+|-) ([\d.]+)(?: (\d+))?$", line)
    if m:
        vmm, t0, mu, end, status = m.groups()
        if mu == "-" or status != "0":
            failed[vmm] += 1
            continue
        boot[vmm].append(float(mu) - float(t0))
        total[vmm].append(float(end) - float(t0))
    m = re.match(r"BENCH-ANALYZE (\w+) (.*)", line)
    if m:
        analyze[m.group(1)].append(m.group(2))
if not boot["nvmm"] or not boot["qemu"]:
    sys.exit(f"bench-debian: no complete runs for {'nvmm' if not boot['nvmm'] else 'qemu'} "
             f"(failed runs: {failed}; see the BENCH- lines above)")
print("Debian 12 (cloud kernel, systemd) to multi-user.target, 2 vCPUs, 1 GiB, in the lab "
      "(L1 VMM, TCG-inflated), seconds:")
print(f"  {'':14} {'runs':>4} {'median':>8} {'min':>8}   {'to exit (median)':>16}")
for vmm, name in (("nvmm", "nvmm"), ("qemu", "qemu microvm")):
    b = boot[vmm]
    print(f"  {name:14} {len(b):4} {statistics.median(b):8.1f} {min(b):8.1f}   "
          f"{statistics.median(total[vmm]):16.1f}" + (f"   ({failed[vmm]} failed)" if failed[vmm] else ""))
print(f"  nvmm/qemu      median {statistics.median(boot['nvmm']) / statistics.median(boot['qemu']):.2f}, "
      f"min {min(boot['nvmm']) / min(boot['qemu']):.2f}")
print("systemd-analyze inside the guest:")
for vmm in ("nvmm", "qemu"):
    for a in analyze[vmm]:
        print(f"  {vmm:5} {a}")
PY
