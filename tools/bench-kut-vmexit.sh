#!/bin/bash
# kvm-unit-tests' vmexit.flat (cpuid, vmcall, mov_to_cr8, inl_from_kernel, inl_from_qemu,
# tscdeadline, ipi) under nvmm and under QEMU (-accel kvm -cpu host), in cycles per exit:
#   L1: run by the VMM in the lab guest;
#   L2: run by the VMM in a Linux guest of the same VMM at L1 (nvmm --nested in nvmm --nested,
#       QEMU -cpu host in QEMU -M pc -cpu host), as each would be used at depth;
#   crossed: each VMM in a Linux guest of the other at L1, which tells what the L2 VMM itself
#       does from what the L1 VMM's set-up of the L2 hypervisor does.
# And `nvmm bench exits` at L1 and in nvmm's L2, for the kinds both measure. TCG inflates absolute
# numbers; compare within a column and between VMMs at a layer.
# Each round runs nvmm then QEMU at a layer, so load from other work falls on both alike; with
# several rounds each cell is the median / minimum over them, and the ratios are of medians and of
# minimums. `nvmm bench exits` runs once per layer, after the rounds.
#
# Usage: tools/bench-kut-vmexit.sh [--rounds N] [--keep DIR]   (default 1 round)
#   NVMM_ARGS="--thp off" ...: more options for nvmm wherever it runs a guest, to measure what one
#   of its defaults buys.
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

# One round of measurements, the same at every layer ($1 = layer, $2 = the round, whose parity
# picks which VMM goes first). QEMU gets the devices kvm-unit-tests' x86/run gives it; vmexit.flat
# finds pci-testdev and adds its own rows, which are left out.
cat > "$tmp/measure.sh" <<'SCRIPT'
layer=$1 round=$2 NVMM_ARGS="$3"
one() {
    vmm=$1 smp=$2; shift 2
    if [ $vmm = nvmm ]; then
        timeout 1800 /lab/nvmm $NVMM_ARGS --nested --debug-exit --kernel /lab/vmexit.flat --cpus $smp --mem 128M \
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
order="nvmm qemu"
[ $((round % 2)) = 0 ] && order="qemu nvmm"
for vmm in $order; do
    one $vmm 1 cpuid vmcall mov_to_cr8 inl_from_kernel inl_from_qemu tscdeadline
    one $vmm 2 ipi
done
/lab/nvmm bench exits --json --iterations 2000 > /tmp/bench.json && echo "BENCH-JSON $layer $(tr -d '\n' < /tmp/bench.json)"
exit 0
SCRIPT

# The L2 image, once per L1 VMM: the layer's name in its reports says which ran it, the kernel
# command line which round it is.
for l1 in nvmm qemu; do
    echo "sh /lab/measure.sh L2-in-$l1 \$(sed -n 's/.*bench.round=\\([0-9]*\\).*/\\1/p' /proc/cmdline) '${NVMM_ARGS:-}'" > "$tmp/l2-$l1.sh"
    "$REPO_ROOT/tools/mkcpio.sh" "$tmp/l2-$l1.extra" "$nvmm:/lab/nvmm" "$kut/vmexit.flat:/lab/vmexit.flat" \
        "$tmp/measure.sh:/lab/measure.sh" "$tmp/l2-$l1.sh:/lab/run.sh" "${cpio_files[@]}"
    cat "$GUEST_DIR/initramfs.cpio" "$tmp/l2-$l1.extra" > "$tmp/l2-$l1.cpio"
done
# Each round measures at L1, then in each VMM's L2 guest, which goes first alternating too.
cat > "$tmp/l1.sh" <<SCRIPT
l2() {
    if [ \$1 = nvmm ]; then
        /lab/nvmm ${NVMM_ARGS:-} --nested --kernel /lab/bzImage --initrd /lab/l2-nvmm.cpio --mem 1024M --cpus 2 \\
            --cmdline "console=ttyS0 reboot=k panic=1 quiet nvmm.run=/lab/run.sh bench.round=\$2" < /dev/null
    else
        qemu-system-x86_64 -M pc -accel kvm -cpu host -smp 2 -m 1024 -nodefaults -display none -serial stdio -no-reboot \\
            -kernel /lab/bzImage -initrd /lab/l2-qemu.cpio \\
            -append "console=ttyS0 reboot=t panic=1 quiet nvmm.run=/lab/run.sh bench.round=\$2" < /dev/null
    fi
    echo "L1-\$1-STATUS=\$?"
}
for round in \$(seq $rounds); do
    sh /lab/measure.sh L1 \$round '${NVMM_ARGS:-}'
    if [ \$((round % 2)) = 1 ]; then l2 nvmm \$round; l2 qemu \$round; else l2 qemu \$round; l2 nvmm \$round; fi
done
SCRIPT
"$REPO_ROOT/tools/lab.sh" --append nvmm.layer=1 --mem 3072 --timeout $((3600 + 3600 * rounds)) \
    --file "$nvmm:/lab/nvmm" --file "$kut/vmexit.flat:/lab/vmexit.flat" --file "$tmp/measure.sh:/lab/measure.sh" \
    --file "$GUEST_DIR/bzImage:/lab/bzImage" --file "$tmp/l2-nvmm.cpio:/lab/l2-nvmm.cpio" \
    --file "$tmp/l2-qemu.cpio:/lab/l2-qemu.cpio" "${lab_files[@]}" \
    "$tmp/l1.sh" > "$tmp/console.log" 2>&1 || true
[ -n "$keep" ] && mkdir -p "$keep" && cp "$tmp/console.log" "$keep/"

python3 - "$tmp/console.log" <<'PY'
import json, re, statistics, sys
cycles, bench, status = {}, {}, {}
for line in open(sys.argv[1], errors="replace"):
    line = line.replace("\r", "").strip()
    if m := re.search(r"VMEXIT-STATUS ([\w-]+) (\w+) (\d+)", line):
        status.setdefault((m.group(1), m.group(2)), []).append(m.group(3))
    elif m := re.search(r"VMEXIT ([\w-]+) (\w+) (\w+) (\d+)$", line):
        cycles.setdefault((m.group(1), m.group(2), m.group(3)), []).append(int(m.group(4)))
    elif m := re.search(r"BENCH-JSON ([\w-]+) (\{.*\})", line):
        try:
            for r in json.loads(m.group(2))["exits"]:
                bench.setdefault(m.group(1), {}).setdefault(r["name"], []).append(r)
        except (json.JSONDecodeError, KeyError) as e:
            print(f"bench-kut-vmexit: the {m.group(1)} bench report is damaged: {e}", file=sys.stderr)
if not cycles:
    sys.exit("bench-kut-vmexit: no vmexit.flat result (run with --keep DIR and read the console log)")
kinds = ["cpuid", "vmcall", "mov_to_cr8", "inl_from_kernel", "inl_from_qemu", "tscdeadline", "ipi"]
rounds = max(len(v) for v in cycles.values())
med = lambda v: statistics.median(v) if v else None
lo = lambda v: min(v) if v else None
def ratio(a, b):
    return f"{b / a:.2f}" if a and b else "-"
def cell(v):
    return "-" if not v else f"{med(v):.0f}" if len(v) == 1 else f"{med(v):.0f} / {lo(v)}"
def table(title, columns, pairs):
    """columns: (label, layer, vmm); pairs: (label, i, j) for a QEMU/nvmm ratio of columns i, j."""
    print(title)
    w = 20 if rounds > 1 else 10
    print(f"{'test':<16}" + "".join(f"{c[0]:>{w}}" for c in columns) + "".join(f"{p[0]:>{len(p[0]) + 2}}" for p in pairs))
    for k in kinds:
        got = [cycles.get((layer, vmm, k), []) for _, layer, vmm in columns]
        rs = "".join(f"{(ratio(med(got[i]), med(got[j])) + ' ' + ratio(lo(got[i]), lo(got[j])) if rounds > 1 else ratio(med(got[i]), med(got[j]))):>{len(p) + 2}}"
                     for p, i, j in pairs)
        print(f"{k:<16}" + "".join(f"{cell(g):>{w}}" for g in got) + rs)
    print()
print("vmexit.flat, cycles per iteration" + (f", median / minimum of {rounds} rounds" if rounds > 1 else "")
      + "; QEMU/nvmm above 1 means nvmm is cheaper" + (" (ratios of medians, then of minimums)" if rounds > 1 else ""))
print("statuses: " + ", ".join(f"{l} {v} {'/'.join(s)}" for (l, v), s in status.items()) + "\n")
table("Each VMM on its own: at L1, and at L2 in a guest of itself",
      [("nvmm L1", "L1", "nvmm"), ("QEMU L1", "L1", "qemu"), ("nvmm L2", "L2-in-nvmm", "nvmm"), ("QEMU L2", "L2-in-qemu", "qemu")],
      [("QEMU/nvmm L1", 0, 1), ("QEMU/nvmm L2", 2, 3)])
table("Crossed at L2: the L2 VMM (rows of one L1 VMM) and the L1 VMM (same L2 VMM, other L1 VMM)",
      [("nvmm in nvmm", "L2-in-nvmm", "nvmm"), ("QEMU in nvmm", "L2-in-nvmm", "qemu"), ("nvmm in QEMU", "L2-in-qemu", "nvmm"), ("QEMU in QEMU", "L2-in-qemu", "qemu")],
      [("L2 VMM, in nvmm", 0, 1), ("L2 VMM, in QEMU", 2, 3), ("L1 VMM, nvmm at L2", 0, 2), ("L1 VMM, QEMU at L2", 1, 3)])
print("nvmm bench exits in the same guests, median TSC cycles, the median over the rounds:")
layers = [l for l in ("L1", "L2-in-nvmm", "L2-in-qemu") if l in bench]
print(f"{'exit':<16}" + "".join(f"{l:>12}" for l in layers) + "  CPL")
for name, r1 in bench.get("L1", {}).items():
    def fmt(l):
        c = [r["median_cycles"] for r in bench[l].get(name, []) if r.get("median_cycles") is not None]
        return f"{statistics.median(c):.0f}" if c else "-"
    print(f"{name:<16}" + "".join(f"{fmt(l):>12}" for l in layers) + f"  {r1[0].get('cpl', '-')}")
PY
