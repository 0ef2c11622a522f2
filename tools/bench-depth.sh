#!/bin/bash
# nvmm against QEMU at depth, side by side in one lab guest (L1), same kernel and initramfs:
#   L2: the L1 VMM (nvmm, or QEMU -M microvm -cpu host) boots L2 to userspace and L2 reboots;
#       wall time of the VMM process, seen from L1's clock;
#   L3: nvmm --nested at L1 runs nvmm at L2, against QEMU -cpu host at L1 running QEMU -cpu host
#       at L2 (both -M microvm); wall time of the L3 VMM process seen from L2's clock, and of
#       the whole three-layer run seen from L1's.
# One round runs the four in turn (nvmm L2, QEMU L2, nvmm L3, QEMU L3), so load from other work
# falls on both VMMs alike. Medians and minimums per row; the minimums matter on a loaded machine.
# nvmm runs with --log-level info: its exit profile (README) and what it mapped before the first
# KVM_RUN (prefault) come out as BENCH-PROFILE lines.
# Both get the same command line below, each VMM adding its own defaults: nvmm appends pci=off
# (it has no PCI bus; README), QEMU's microvm adds nothing, so its guests still probe ports
# 0xcf8-0xcff for a PCI bus (about 230 port exits each boot).
# L2 has 384 MiB, L3 96 MiB, one vCPU each. Times come from /proc/uptime (10 ms steps).
# TCG inflates absolute numbers; the nvmm/QEMU ratios are what this measures.
#
# Usage: tools/bench-depth.sh [ROUNDS]   (default 5)
#   NVMM_ARGS="--thp off" tools/bench-depth.sh: more options for nvmm at both layers, to measure
#   what one of its defaults buys.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
rounds="${1:-5}"
nvmm_args="${NVMM_ARGS:-}"
"$REPO_ROOT/tools/build-guest.sh" >&2
nvmm="$("$REPO_ROOT/tools/build-nvmm.sh")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

base="console=ttyS0 panic=1 quiet nvmm.run=/lab/run.sh"
nvmm_cmdline="$base reboot=k"
qemu_cmdline="$base reboot=t"
qemu_fw=()
for f in qboot.rom bios-microvm.bin linuxboot_dma.bin pvh.bin; do
    qemu_fw+=("/usr/share/qemu/$f:/usr/share/qemu/$f")
done

# Times one VMM run: prints "BENCH-<tag> <name> <seconds>" if the guest reached userspace, and
# passes on the BENCH lines of the layer below. Used at L1 and at L2 alike.
timed='timed() {
    tag="$1" name="$2"; shift 2
    t0=$(cut -d" " -f1 /proc/uptime)
    "$@" > /run/out 2>&1 < /dev/null || true
    t1=$(cut -d" " -f1 /proc/uptime)
    tr -d "\r" < /run/out | grep "^BENCH-" || true
    tr -d "\r" < /run/out | grep "^nvmm: info: \(profile\|prefault\): " | sed "s/^nvmm: info: /BENCH-PROFILE $tag $name /" || true
    if grep -q NVMM-USERSPACE /run/out; then
        echo "BENCH-$tag $name $(awk "BEGIN { print $t1 - $t0 }")"
    else
        echo "BENCH-FAIL $tag $name"; tail -n 20 /run/out
    fi
}'

# image NAME SCRIPT [mkcpio args]...: the base initramfs plus SCRIPT at /lab/run.sh and the files.
image() {
    local name="$1" script="$2"; shift 2
    printf '%s\n' "$script" > "$tmp/$name.sh"
    "$REPO_ROOT/tools/mkcpio.sh" "$tmp/$name.extra" "$tmp/$name.sh:/lab/run.sh" "$@"
    cat "$GUEST_DIR/initramfs.cpio" "$tmp/$name.extra" > "$tmp/$name.cpio"
}
image leaf 'exit 0'
# Linux turns transparent huge pages off by itself below 512 MiB of RAM, which L2's 384 MiB is (and
# only sysfs turns them back on): madvise mode gives both L2 VMMs the huge pages they ask for (both
# do) for L3's RAM.
thp='echo madvise > /sys/kernel/mm/transparent_hugepage/enabled'
image l2nvmm "$timed
$thp
timed L3 nvmm /lab/nvmm $nvmm_args --log-level info --kernel /lab/bzImage --initrd /lab/leaf.cpio --mem 96M --cmdline '$nvmm_cmdline'" \
    "$nvmm:/lab/nvmm" "$GUEST_DIR/bzImage:/lab/bzImage" "$tmp/leaf.cpio:/lab/leaf.cpio"
image l2qemu "$timed
$thp
timed L3 qemu /usr/bin/qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -smp 1 -m 96 -nographic -no-reboot \
    -kernel /lab/bzImage -initrd /lab/leaf.cpio -append '$qemu_cmdline'" \
    --bin /usr/bin/qemu-system-x86_64 "${qemu_fw[@]}" "$GUEST_DIR/bzImage:/lab/bzImage" "$tmp/leaf.cpio:/lab/leaf.cpio"

cat > "$tmp/l1.sh" <<SCRIPT
$timed
qemu() {
    /usr/bin/qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -smp 1 -m "\$1" -nographic -no-reboot \
        -kernel /lab/bzImage -initrd "\$2" -append '$qemu_cmdline'
}
for i in \$(seq $rounds); do
    timed L2 nvmm /lab/nvmm $nvmm_args --log-level info --kernel /lab/bzImage --initrd /lab/leaf.cpio --mem 384M --cmdline '$nvmm_cmdline'
    timed L2 qemu qemu 384 /lab/leaf.cpio
    timed L1VIEW nvmm /lab/nvmm $nvmm_args --nested --log-level info --kernel /lab/bzImage --initrd /lab/l2nvmm.cpio --mem 384M --cmdline '$nvmm_cmdline'
    timed L1VIEW qemu qemu 384 /lab/l2qemu.cpio
done
SCRIPT

lab_files=()
for f in "${qemu_fw[@]}" "$nvmm:/lab/nvmm" "$GUEST_DIR/bzImage:/lab/bzImage" \
    "$tmp/leaf.cpio:/lab/leaf.cpio" "$tmp/l2nvmm.cpio:/lab/l2nvmm.cpio" "$tmp/l2qemu.cpio:/lab/l2qemu.cpio"; do
    lab_files+=(--file "$f")
done
"$REPO_ROOT/tools/lab.sh" --append quiet --mem 3072 --timeout $((180 + 120 * rounds)) \
    --bin /usr/bin/qemu-system-x86_64 "${lab_files[@]}" \
    "$tmp/l1.sh" | tee "$tmp/console.log" | grep --line-buffered '^BENCH-' >&2 || true

python3 - "$tmp/console.log" <<'PY'
import re, statistics, sys
t = {}
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"BENCH-(L2|L3|L1VIEW) (nvmm|qemu) ([\d.]+)$", line.strip())
    if m:
        t.setdefault((m.group(1), m.group(2)), []).append(float(m.group(3)))
rows = [("L2", "L2 boot+reboot, seen from L1"), ("L3", "L3 boot+reboot, seen from L2"), ("L1VIEW", "L2+L3 whole run, seen from L1")]
if not any(t.values()):
    sys.exit("bench-depth: no complete runs (see the console above)")
print("seconds, in the lab (TCG-inflated); median / min (runs)   nvmm vs QEMU")
print(f"  {'':32} {'nvmm':>20} {'qemu':>20} {'ratio med':>10} {'ratio min':>10}")
for key, label in rows:
    n, q = t.get((key, "nvmm"), []), t.get((key, "qemu"), [])
    cell = lambda v: f"{statistics.median(v):6.2f} / {min(v):5.2f} ({len(v)})" if v else f"{'-':>20}"
    ratio = lambda f: f"{f(n) / f(q):10.2f}" if n and q else f"{'-':>10}"
    print(f"  {label:32} {cell(n):>20} {cell(q):>20} {ratio(statistics.median)} {ratio(min)}")
PY
