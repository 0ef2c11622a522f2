#!/bin/bash
# Boot time to userspace at L2 and at L3, in the lab: L1 runs `nvmm --nested` for L2, and L2 runs nvmm
# for L3. Each nvmm's boot timer measures its guest: from nvmm's start to the guest /init's write to
# port 0x440. Medians of N rounds, and the L3/L2 ratio. TCG inflates absolute numbers.
#
# Usage: tools/bench-nested.sh [ROUNDS]   (default 5)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
rounds="${1:-5}"
"$REPO_ROOT/tools/build-guest.sh" >&2
nvmm="$("$REPO_ROOT/tools/build-nvmm.sh")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cmdline="console=ttyS0 reboot=k panic=1 quiet nvmm.run=/lab/run.sh"

# image NAME SCRIPT [SRC:DST]...: the base initramfs plus SCRIPT at /lab/run.sh and the files.
image() {
    local name="$1" script="$2"; shift 2
    printf '%s\n' "$script" > "$tmp/$name.sh"
    "$REPO_ROOT/tools/mkcpio.sh" "$tmp/$name.extra" "$tmp/$name.sh:/lab/run.sh" "$@"
    cat "$GUEST_DIR/initramfs.cpio" "$tmp/$name.extra" > "$tmp/$name.cpio"
}
image l3 'exit 0'
image l2 "/lab/nvmm --log-level info --kernel /lab/bzImage --initrd /lab/l3.cpio --mem 128M --cmdline '$cmdline' 2>&1 | sed 's/^nvmm: info: guest boot time: /BENCH-L3 /'" \
    "$nvmm:/lab/nvmm" "$GUEST_DIR/bzImage:/lab/bzImage" "$tmp/l3.cpio:/lab/l3.cpio"
cat > "$tmp/l1.sh" <<SCRIPT
for i in \$(seq $rounds); do
    /lab/nvmm --nested --log-level info --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 512M \
        --cmdline '$cmdline' 2>&1 | sed 's/^nvmm: info: guest boot time: /BENCH-L2 /'
done
SCRIPT
"$REPO_ROOT/tools/lab.sh" --append quiet --timeout $((120 + 120 * rounds)) \
    --file "$nvmm:/lab/nvmm" --file "$GUEST_DIR/bzImage:/lab/bzImage" --file "$tmp/l2.cpio:/lab/l2.cpio" \
    "$tmp/l1.sh" | tee "$tmp/console.log" | grep --line-buffered '^BENCH-' >&2 || true

python3 - "$tmp/console.log" <<'PY'
import re, statistics, sys
t = {"L2": [], "L3": []}
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"BENCH-(L[23]) ([\d.]+) ms", line.strip())
    if m:
        t[m.group(1)].append(float(m.group(2)))
if not t["L2"] or not t["L3"]:
    sys.exit("bench-nested: no complete rounds (see the console above)")
l2, l3 = statistics.median(t["L2"]), statistics.median(t["L3"])
print(f"boot to userspace (nvmm boot timer), median of {len(t['L2'])} rounds, in the lab (TCG-inflated):")
print(f"  L2 (booted by nvmm --nested at L1)  {l2:8.0f} ms   (min {min(t['L2']):.0f}, max {max(t['L2']):.0f})")
print(f"  L3 (booted by nvmm at L2)           {l3:8.0f} ms   (min {min(t['L3']):.0f}, max {max(t['L3']):.0f})")
print(f"  L3/L2                               {l3 / l2:8.2f}")
PY
