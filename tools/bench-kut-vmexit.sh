#!/bin/bash
# kvm-unit-tests' vmexit.flat (cpuid, vmcall, mov_to_cr8, inl_from_kernel, inl_from_qemu,
# tscdeadline, ipi) under nvmm and under QEMU (-accel kvm -cpu host), at L1 (the lab guest) and at
# L2 (a Linux guest of nvmm --nested at L1), in cycles per exit with the L2/L1 ratio; and
# `nvmm bench exits` in the same two guests, for the kinds both measure. TCG inflates absolute
# numbers; compare within a column and between VMMs at a layer.
# Each round runs nvmm then QEMU at a layer, so load from other work falls on both alike; with
# several rounds each cell is the median / minimum over them, and the ratios are of medians and of
# minimums. `nvmm bench exits` runs once per layer, after the rounds.
#
# Usage: tools/bench-kut-vmexit.sh [--rounds N] [--keep DIR]   (default 1 round)
# Needs build/guest (tools/build-guest.sh); builds the suite and nvmm unless NVMM_BIN names one.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

keep= rounds=1
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) keep="${2:?--keep needs a directory}"; shift 2 ;;
        --rounds) rounds="${2:?--rounds needs a number}"; shift 2 ;;
        *) echo "usage: $0 [--rounds N] [--keep DIR]" >&2; exit 1 ;;
    esac
done
case "$rounds" in ''|*[!0-9]*|0) echo "bench-kut-vmexit: --rounds wants a positive number, not '$rounds'" >&2; exit 1 ;; esac
kut="$("$REPO_ROOT/tools/kvm-unit-tests.sh" --build-only)"
nvmm="${NVMM_BIN:-$("$REPO_ROOT/tools/build-nvmm.sh")}"
ensure_pkgs qemu-system-x86 cpio python3 >&2
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

qemu_firmware=(/usr/share/seabios/bios-256k.bin /usr/share/qemu/kvmvapic.bin /usr/share/qemu/linuxboot_dma.bin
               /usr/share/qemu/multiboot_dma.bin)
cpio_files=(--bin qemu-system-x86_64) lab_files=(--bin qemu-system-x86_64)
for f in "${qemu_firmware[@]}"; do
    cpio_files+=("$f:/usr/share/qemu/$(basename "$f")")
    lab_files+=(--file "$f:/usr/share/qemu/$(basename "$f")")
done

# The measurements, the same at both layers ($1 = layer). QEMU gets the devices kvm-unit-tests'
# x86/run gives it; vmexit.flat finds pci-testdev and adds its own rows, which are left out.
cat > "$tmp/measure.sh" <<'SCRIPT'
layer=$1 rounds=$2
one() {
    vmm=$1 smp=$2; shift 2
    if [ $vmm = nvmm ]; then
        timeout 1800 /lab/nvmm --nested --debug-exit --kernel /lab/vmexit.flat --cpus $smp --mem 128M \
            --cmdline="$*" < /dev/null > /tmp/v.log 2>&1
    else
        timeout 1800 qemu-system-x86_64 -accel kvm -cpu host -smp $smp -m 128 --no-reboot -nodefaults \
            -display none -serial stdio -monitor none -device pc-testdev -device pci-testdev \
            -device isa-debug-exit,iobase=0xf4,iosize=0x4 -kernel /lab/vmexit.flat -append "$*" \
            < /dev/null > /tmp/v.log 2>&1
    fi
    echo "VMEXIT-STATUS $layer $vmm $?"
    sed "s/^/VMEXIT $layer $vmm /" /tmp/v.log | tr -d '\r'
}
for round in $(seq $rounds); do
    for vmm in nvmm qemu; do
        one $vmm 1 cpuid vmcall mov_to_cr8 inl_from_kernel inl_from_qemu tscdeadline
        one $vmm 2 ipi
    done
done
/lab/nvmm bench exits --json --iterations 2000 > /tmp/bench.json && echo "BENCH-JSON $layer $(tr -d '\n' < /tmp/bench.json)"
exit 0
SCRIPT

echo "sh /lab/measure.sh L2 $rounds" > "$tmp/l2.sh"
"$REPO_ROOT/tools/mkcpio.sh" "$tmp/l2.extra" "$nvmm:/lab/nvmm" "$kut/vmexit.flat:/lab/vmexit.flat" \
    "$tmp/measure.sh:/lab/measure.sh" "$tmp/l2.sh:/lab/run.sh" "${cpio_files[@]}"
cat "$GUEST_DIR/initramfs.cpio" "$tmp/l2.extra" > "$tmp/l2.cpio"
cat > "$tmp/l1.sh" <<SCRIPT
sh /lab/measure.sh L1 $rounds
/lab/nvmm --nested --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 1024M --cpus 2 \
    --cmdline 'console=ttyS0 reboot=k panic=1 quiet nvmm.run=/lab/run.sh' < /dev/null
echo "L1-NVMM-STATUS=\$?"
SCRIPT
"$REPO_ROOT/tools/lab.sh" --append nvmm.layer=1 --mem 3072 --timeout $((3600 + 3600 * rounds)) \
    --file "$nvmm:/lab/nvmm" --file "$kut/vmexit.flat:/lab/vmexit.flat" --file "$tmp/measure.sh:/lab/measure.sh" \
    --file "$GUEST_DIR/bzImage:/lab/bzImage" --file "$tmp/l2.cpio:/lab/l2.cpio" "${lab_files[@]}" \
    "$tmp/l1.sh" > "$tmp/console.log" 2>&1 || true
[ -n "$keep" ] && mkdir -p "$keep" && cp "$tmp/console.log" "$keep/"

python3 - "$tmp/console.log" <<'PY'
import json, re, statistics, sys
cycles, bench, status = {}, {}, {}
for line in open(sys.argv[1], errors="replace"):
    line = line.replace("\r", "").strip()
    if m := re.search(r"VMEXIT-STATUS (L\d) (\w+) (\d+)", line):
        status[(m.group(1), m.group(2))] = status.get((m.group(1), m.group(2)), []) + [m.group(3)]
    elif m := re.search(r"VMEXIT (L\d) (\w+) (\w+) (\d+)$", line):
        cycles.setdefault((m.group(1), m.group(2), m.group(3)), []).append(int(m.group(4)))
    elif m := re.search(r"BENCH-JSON (L\d) (\{.*\})", line):
        try:
            bench[m.group(1)] = {r["name"]: r for r in json.loads(m.group(2))["exits"]}
        except (json.JSONDecodeError, KeyError) as e:
            print(f"bench-kut-vmexit: the {m.group(1)} bench report is damaged: {e}", file=sys.stderr)
if not cycles:
    sys.exit("bench-kut-vmexit: no vmexit.flat result (run with --keep DIR and read the console log)")
kinds = ["cpuid", "vmcall", "mov_to_cr8", "inl_from_kernel", "inl_from_qemu", "tscdeadline", "ipi"]
def ratio(a, b):
    return f"{b / a:.2f}" if a and b else "-"
def cell(v):
    return "-" if not v else f"{statistics.median(v):.0f}" if len(v) == 1 else f"{statistics.median(v):.0f} / {min(v)}"
rounds = max((len(v) for v in cycles.values()), default=0)
print("vmexit.flat, cycles per iteration" + (f", median / minimum of {rounds} rounds" if rounds > 1 else "")
      + " (statuses: " + ", ".join(f"{l} {v} {'/'.join(s)}" for (l, v), s in status.items()) + ")")
print("QEMU/nvmm above 1 means nvmm is cheaper; L2/L1 of medians.")
w = 20 if rounds > 1 else 10
print(f"{'test':<16}{'nvmm L1':>{w}}{'nvmm L2':>{w}}{'L2/L1':>7}{'QEMU L1':>{w}}{'QEMU L2':>{w}}{'L2/L1':>7}"
      + ("  QEMU/nvmm L1 med min  L2 med min" if rounds > 1 else "  QEMU/nvmm L1    L2"))
for k in kinds:
    n1, n2, q1, q2 = (cycles.get((l, v, k), []) for v in ("nvmm", "qemu") for l in ("L1", "L2"))
    med = lambda v: statistics.median(v) if v else None
    lo = lambda v: min(v) if v else None
    ratios = f"{ratio(med(n1), med(q1)):>15}{ratio(lo(n1), lo(q1)):>5}{ratio(med(n2), med(q2)):>6}{ratio(lo(n2), lo(q2)):>5}" \
        if rounds > 1 else f"{ratio(med(n1), med(q1)):>15}{ratio(med(n2), med(q2)):>6}"
    print(f"{k:<16}{cell(n1):>{w}}{cell(n2):>{w}}{ratio(med(n1), med(n2)):>7}{cell(q1):>{w}}{cell(q2):>{w}}{ratio(med(q1), med(q2)):>7}{ratios}")
print("\nnvmm bench exits in the same guests, median TSC cycles (the kinds vmexit.flat also measures):")
print(f"{'exit':<16}{'L1':>10}{'L2':>10}{'L2/L1':>7}  CPL")
for name, r1 in bench.get("L1", {}).items():
    r2 = bench.get("L2", {}).get(name, {})
    c1, c2 = r1.get("median_cycles"), r2.get("median_cycles")
    fmt = lambda c: "-" if c is None else f"{c:.0f}"
    print(f"{name:<16}{fmt(c1):>10}{fmt(c2):>10}{ratio(c1, c2):>7}  {r1.get('cpl', '-')}")
PY
