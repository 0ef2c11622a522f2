#!/bin/bash
# VM-exit latency at L1 and at L2, in the lab: `nvmm bench exits` runs in the lab guest (L1) and in
# an nvmm guest that L1 boots with --nested (L2); the table gives each exit kind's median at both
# layers and the L2/L1 ratio. Then the userspace port I/O exit of one guest image
# (`nvmm bench exits --emit-guest`, a PVH ELF) run by nvmm and by QEMU (-accel kvm) at each layer,
# with the QEMU/nvmm ratio: the same guest code, the same place, two VMMs. The same comparison
# also runs on this machine's own /dev/kvm when it opens (a PVM host runs the image's CPL 0 in
# its instruction emulator, for both VMMs alike).
#
# Usage: tools/bench-exits.sh [--iterations N] [--no-qemu] [--keep DIR]
#   --iterations N  iterations per exit kind (default 2000)
#   --no-qemu       skip the QEMU comparison (the lab and L2 images are much smaller without it)
#   --keep DIR      keep the console log and every JSON report in DIR
# Needs the guest artifacts (tools/build-guest.sh) and builds the static nvmm (tools/build-nvmm.sh)
# unless NVMM_BIN names one. TCG inflates absolute numbers; the ratios are what to read.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '10,15p' "$0" >&2; exit 2; }
iterations=2000 qemu=1 keep=
while [ $# -gt 0 ]; do
    case "$1" in
        --iterations) [ $# -ge 2 ] || usage; iterations="$2"; shift 2 ;;
        --no-qemu)    qemu=0; shift ;;
        --keep)       [ $# -ge 2 ] || usage; keep="$2"; shift 2 ;;
        *)            usage ;;
    esac
done

"$REPO_ROOT/tools/build-guest.sh" >&2
nvmm="${NVMM_BIN:-$("$REPO_ROOT/tools/build-nvmm.sh")}"
ensure_pkgs qemu-system-x86 cpio python3 >&2
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# QEMU, its libraries and the firmware its microvm machine loads (qboot, and the PVH option ROM),
# as mkcpio.sh (for L2) and lab.sh (for L1) take them.
qemu_cpio=() qemu_lab=()
if [ "$qemu" = 1 ]; then
    qemu_cpio=(--bin qemu-system-x86_64) qemu_lab=(--bin qemu-system-x86_64)
    for f in qboot.rom bios-microvm.bin pvh.bin linuxboot_dma.bin; do
        qemu_cpio+=("/usr/share/qemu/$f:/usr/share/qemu/$f")
        qemu_lab+=(--file "/usr/share/qemu/$f:/usr/share/qemu/$f")
    done
fi

# The measurements, the same at both layers ($1 = layer). Each report is printed as one JSON line
# between markers, so that kernel messages on the console cannot split it.
cat > "$tmp/measure.sh" <<SCRIPT
layer=\$1
emit() { echo "BENCH-JSON \$layer \$1 \$(tr -d '\\n' < "\$2")"; }
/lab/nvmm bench exits --json --iterations $iterations > /tmp/bench.json && emit bench /tmp/bench.json
if command -v qemu-system-x86_64 >/dev/null; then
    /lab/nvmm bench exits --iterations $iterations --emit-guest /tmp/exits.elf >/dev/null
    /lab/nvmm --kernel /tmp/exits.elf < /dev/null > /tmp/image-nvmm.txt \\
        && /lab/nvmm bench exits --json --from-console /tmp/image-nvmm.txt --vmm nvmm > /tmp/image-nvmm.json \\
        && emit image-nvmm /tmp/image-nvmm.json
    # microvm has no i8042: the image ends with a triple fault, which -no-reboot turns into an exit.
    timeout 900 qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -m 64 -display none \\
        -serial stdio -monitor none -no-reboot -nic none -kernel /tmp/exits.elf < /dev/null > /tmp/image-qemu.txt 2>&1 \\
        && /lab/nvmm bench exits --json --from-console /tmp/image-qemu.txt --vmm qemu > /tmp/image-qemu.json \\
        && emit image-qemu /tmp/image-qemu.json
fi
exit 0
SCRIPT

# L2: the base initramfs, nvmm, the measurements (and QEMU).
echo 'sh /lab/measure.sh L2' > "$tmp/l2.sh"
"$REPO_ROOT/tools/mkcpio.sh" "$tmp/l2.extra" "$nvmm:/lab/nvmm" "$tmp/measure.sh:/lab/measure.sh" \
    "$tmp/l2.sh:/lab/run.sh" "${qemu_cpio[@]}"
cat "$GUEST_DIR/initramfs.cpio" "$tmp/l2.extra" > "$tmp/l2.cpio"

# L1: measure, then boot L2 (stdin from /dev/null: L2 needs no console input).
cat > "$tmp/l1.sh" <<SCRIPT
sh /lab/measure.sh L1
/lab/nvmm --nested --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 1024M \\
    --cmdline 'console=ttyS0 reboot=k panic=1 quiet nvmm.run=/lab/run.sh' < /dev/null
echo "L1-NVMM-STATUS=\$?"
SCRIPT
"$REPO_ROOT/tools/lab.sh" --append nvmm.layer=1 --timeout 3000 \
    --file "$nvmm:/lab/nvmm" --file "$GUEST_DIR/bzImage:/lab/bzImage" --file "$tmp/l2.cpio:/lab/l2.cpio" \
    --file "$tmp/measure.sh:/lab/measure.sh" "${qemu_lab[@]}" \
    "$tmp/l1.sh" > "$tmp/console.log" 2>&1 || true

# This machine's own /dev/kvm: the image under nvmm and under QEMU. -cpu qemu64: with -cpu host,
# QEMU sets MSRs a PVM host refuses (0x10a) and aborts.
if [ "$qemu" = 1 ] && [ -w /dev/kvm ]; then
    "$nvmm" bench exits --iterations "$iterations" --emit-guest "$tmp/exits.elf" >/dev/null
    if "$nvmm" --kernel "$tmp/exits.elf" < /dev/null > "$tmp/host-nvmm.txt" \
        && "$nvmm" bench exits --json --from-console "$tmp/host-nvmm.txt" --vmm nvmm > "$tmp/host-nvmm.json"; then
        echo "BENCH-JSON host image-nvmm $(tr -d '\n' < "$tmp/host-nvmm.json")" >> "$tmp/console.log"
    fi
    if timeout 900 qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu qemu64 -m 64 -display none \
            -serial stdio -monitor none -no-reboot -nic none -kernel "$tmp/exits.elf" < /dev/null > "$tmp/host-qemu.txt" 2>&1 \
        && "$nvmm" bench exits --json --from-console "$tmp/host-qemu.txt" --vmm qemu > "$tmp/host-qemu.json"; then
        echo "BENCH-JSON host image-qemu $(tr -d '\n' < "$tmp/host-qemu.json")" >> "$tmp/console.log"
    fi
fi
grep -a '^BENCH-JSON' "$tmp/console.log" | cut -c1-40 >&2 || true
if [ -n "$keep" ]; then
    mkdir -p "$keep" && cp "$tmp/console.log" "$keep/"
fi

python3 - "$tmp/console.log" "$keep" <<'PY'
import json, sys
reports = {}
for line in open(sys.argv[1], errors="replace"):
    line = line.strip().replace("\r", "")
    if line.startswith("BENCH-JSON "):
        _, layer, what, text = line.split(" ", 3)
        try:
            reports[(layer, what)] = json.loads(text)
        except json.JSONDecodeError as e:
            print(f"bench-exits: the {layer} {what} report is damaged: {e}", file=sys.stderr)
if sys.argv[2]:
    for (layer, what), r in reports.items():
        json.dump(r, open(f"{sys.argv[2]}/{layer}-{what}.json", "w"), indent=1)
l1, l2 = reports.get(("L1", "bench")), reports.get(("L2", "bench"))
if not l1 or not l2:
    sys.exit("bench-exits: no L1 and L2 reports (see the console log: --keep DIR)")

def rows(r):
    return {row["name"]: row for row in r["exits"]}

def fmt(v):
    return "-" if v is None else f"{v:.1f}"

print(f"nvmm bench exits, {l1['iterations']} iterations per kind, in the lab (QEMU TCG with nested SVM):")
print(f"  L1: {l1['cpu']['model']}, {l1['kvm_module']}, mode {l1['mode']}; TSC {l1['tsc_khz'] / 1000:.0f} MHz")
print(f"  L2: booted by nvmm --nested at L1, {l2['kvm_module']}, mode {l2['mode']}")
print(f"  loop cost subtracted: L1 {l1['baselines'][0]['median_ns']:.1f} ns, L2 {l2['baselines'][0]['median_ns']:.1f} ns")
print()
print(f"{'exit':<15} {'handled in':<10} {'L1 median ns':>13} {'L1 min ns':>11} {'L2 median ns':>13} {'L2 min ns':>11} {'L2/L1':>7}")
r1, r2 = rows(l1), rows(l2)
for name, a in r1.items():
    b = r2.get(name, {})
    ratio = b.get("median_ns") / a["median_ns"] if b.get("median_ns") and a.get("median_ns") else None
    print(f"{name:<15} {a['handled_in']:<10} {fmt(a.get('median_ns')):>13} {fmt(a.get('min_ns')):>11} "
          f"{fmt(b.get('median_ns')):>13} {fmt(b.get('min_ns')):>11} {'-' if ratio is None else f'{ratio:.2f}':>7}")

images = [(layer, reports.get((layer, "image-nvmm")), reports.get((layer, "image-qemu"))) for layer in ("L1", "L2", "host")]
if any(n or q for _, n, q in images):
    print()
    print("userspace port I/O exit (out to port 0x80 at CPL 0), the same --emit-guest image under each VMM:")
    print(f"{'where':<14} {'nvmm median ns':>15} {'nvmm min ns':>12} {'QEMU median ns':>15} {'QEMU min ns':>12} {'QEMU/nvmm':>10}")
    for layer, n, q in images:
        if not n and not q:
            continue
        where = layer if layer != "host" else f"host {(n or q)['kvm_module']}"
        a = n["exits"][0] if n else {}
        b = q["exits"][0] if q else {}
        ratio = b["median_ns"] / a["median_ns"] if a.get("median_ns") and b.get("median_ns") else None
        print(f"{where:<14} {fmt(a.get('median_ns')):>15} {fmt(a.get('min_ns')):>12} {fmt(b.get('median_ns')):>15} "
              f"{fmt(b.get('min_ns')):>12} {'-' if ratio is None else f'{ratio:.2f}':>10}")
PY
