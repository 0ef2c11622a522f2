#!/bin/bash
# Snapshot and restore, nvmm against QEMU, both run as the VMM inside the same lab guest (L1) on the
# same KVM, with the same kernel, initramfs, memory size and vCPU count, alternating run by run.
# The guest (L2) prints a counter every 100 ms. Per VMM and RAM size (256 MiB, 1 GiB):
#   - snapshot: nvmm `PUT /vm/snapshot` on a paused VM; QEMU `stop` then
#     `migrate "exec:cat > FILE"` until `info migrate` says completed;
#   - restore to running: nvmm's own log line (process start to vCPU threads starting); QEMU
#     `-incoming "exec:cat FILE"` from process start to `info status` saying paused (the saved
#     run state), then `cont`, to `info status` saying running;
#   - restore to the guest's next console line, from process start;
#   - snapshot size on disk (du) against the RAM the guest touched (nvmm: the pages it wrote).
# Usage: tools/bench-snapshot.sh [RUNS]   (default 5)
# Timings from L1's /proc/uptime (10 ms steps) unless nvmm reports its own (ms, to 0.1 ms).
# TCG inflates absolute numbers; the ratios are what this measures.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
runs="${1:-5}"
# The guest kernel and initramfs must exist already (tools/build-guest.sh builds them).
for f in bzImage initramfs.cpio; do
    [ -f "$GUEST_DIR/$f" ] || { echo "bench-snapshot: no $GUEST_DIR/$f: run tools/build-guest.sh" >&2; exit 1; }
done
nvmm="$("$REPO_ROOT/tools/build-nvmm.sh")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

cat > "$tmp/guest.sh" <<'GUEST'
i=1
while :; do echo "L2-COUNT $i"; i=$((i+1)); usleep 100000; done
GUEST
"$REPO_ROOT/tools/mkcpio.sh" "$tmp/extra.cpio" "$tmp/guest.sh:/lab/run.sh"
cat "$GUEST_DIR/initramfs.cpio" "$tmp/extra.cpio" > "$tmp/l2.cpio"

cat > "$tmp/l1.sh" <<SCRIPT
cmdline="console=ttyS0 panic=1 quiet nvmm.run=/lab/run.sh"
up() { cut -d' ' -f1 /proc/uptime; }
# Waits (bounded) until file \$1 has \$2 lines matching \$3.
wait_lines() {
    n=0
    # 0 before the file exists (the VMM that creates it starts in the background).
    while c=\$(grep -c "\$3" \$1 2>/dev/null); [ "\${c:-0}" -lt "\$2" ]; do
        usleep 10000; n=\$((n+1)); [ \$n -gt 30000 ] && { echo "BENCH-TIMEOUT \$3 in \$1"; tail -5 \$1; return 1; }
    done
    return 0
}
# Sends an HMP command through QEMU's monitor pipe.
hmp() { echo "\$1" > /tmp/mon.in; }
# Repeats HMP command \$1 until the monitor's output has \$2 (bounded).
hmp_until() {
    n=0
    # "paused (inmigrate)" is QEMU still loading, not the state loaded.
    while ! grep -v inmigrate /tmp/mon.log 2>/dev/null | grep -q "\$2"; do
        hmp "\$1"; usleep 10000; n=\$((n+1))
        [ \$n -gt 6000 ] && { echo "BENCH-TIMEOUT \$2"; tail -5 /tmp/mon.log; tail -5 /tmp/qemu.out; return 1; }
    done
    return 0
}
nvmm_run() {
    mem=\$1 sock=/tmp/api.sock out=/tmp/nvmm.out snap=/tmp/snap
    rm -rf \$snap \$sock \$out
    /lab/nvmm --kernel /lab/bzImage --initrd /lab/l2.cpio --mem \${mem}M --cmdline "\$cmdline reboot=k" --api-socket \$sock --log-level info > \$out 2>&1 </dev/null &
    pid=\$!
    wait_lines \$out 10 L2-COUNT || return
    /lab/nvmm ctl \$sock pause > /dev/null
    t0=\$(up)
    ans=\$(/lab/nvmm ctl \$sock snapshot \$snap)
    t1=\$(up)
    kill -9 \$pid; wait \$pid 2>/dev/null
    ms=\$(echo "\$ans" | sed 's/.*"ms":\([0-9.]*\).*/\1/')
    touched=\$(echo "\$ans" | sed 's/.*"memory_bytes_written":\([0-9]*\).*/\1/')
    echo "BENCH-SNAP nvmm \$mem \$t0 \$t1 \$ms \$(du -k \$snap/memory | cut -f1) \$((touched / 1024)) \$(du -k \$snap/state | cut -f1)"
    before=\$(grep -c L2-COUNT \$out)
    rm -f \$sock
    t0=\$(up)
    /lab/nvmm --restore \$snap --api-socket \$sock --log-level info >> \$out 2>&1 </dev/null &
    pid=\$!
    wait_lines \$out \$((before + 1)) L2-COUNT || return
    t1=\$(up)
    restored=\$(grep 'restored from' \$out | tail -1 | sed 's/.* in \([0-9.]*\) ms.*/\1/')
    echo "BENCH-RESTORE nvmm \$mem \$t0 \$t1 \$restored"
    wait_lines \$out \$((before + 3)) L2-COUNT || return
    /lab/nvmm ctl \$sock shutdown > /dev/null
    wait \$pid
}
qemu_run() {
    mem=\$1 out=/tmp/qemu.out mig=/tmp/q.mig
    rm -f \$out \$mig /tmp/mon.in /tmp/mon.out /tmp/mon.log; mkfifo /tmp/mon.in /tmp/mon.out
    qemu_cmd="qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -smp 1 -m \$mem -nographic -no-reboot -monitor pipe:/tmp/mon -kernel /lab/bzImage -initrd /lab/l2.cpio"
    \$qemu_cmd -append "\$cmdline reboot=t" > \$out 2>&1 </dev/null &
    pid=\$!
    cat /tmp/mon.out > /tmp/mon.log &
    wait_lines \$out 10 L2-COUNT || return
    hmp stop
    t0=\$(up)
    hmp "migrate \"exec:cat > \$mig\""
    hmp_until 'info migrate' 'Migration status: completed' || return
    t1=\$(up)
    hmp quit; wait \$pid 2>/dev/null
    echo "BENCH-SNAP qemu \$mem \$t0 \$t1 - \$(du -k \$mig | cut -f1) - 0"
    before=\$(grep -c L2-COUNT \$out)
    rm -f /tmp/mon.in /tmp/mon.out /tmp/mon.log; mkfifo /tmp/mon.in /tmp/mon.out
    t0=\$(up)
    \$qemu_cmd -append "\$cmdline reboot=t" -incoming "exec:cat \$mig" >> \$out 2>&1 </dev/null &
    pid=\$!
    cat /tmp/mon.out > /tmp/mon.log &
    # The VM was stopped when saved, and QEMU restores that run state: it waits for cont.
    hmp_until 'info status' 'VM status: paused' || return
    hmp cont
    hmp_until 'info status' 'VM status: running' || return
    tr=\$(up)
    wait_lines \$out \$((before + 1)) L2-COUNT || return
    t1=\$(up)
    echo "BENCH-RESTORE qemu \$mem \$t0 \$t1 - \$tr"
    hmp quit; wait \$pid 2>/dev/null
}
for i in \$(seq $runs); do
    for mem in 256 1024; do
        nvmm_run \$mem
        qemu_run \$mem
    done
done
SCRIPT

qemu_files=()
for f in qboot.rom bios-microvm.bin linuxboot_dma.bin pvh.bin; do
    qemu_files+=(--file "/usr/share/qemu/$f:/usr/share/qemu/$f")
done
"$REPO_ROOT/tools/lab.sh" --append quiet --mem 3072 --timeout $((300 + 240 * runs)) \
    --bin /usr/bin/qemu-system-x86_64 "${qemu_files[@]}" \
    --file "$nvmm:/lab/nvmm" --file "$GUEST_DIR/bzImage:/lab/bzImage" --file "$tmp/l2.cpio:/lab/l2.cpio" \
    "$tmp/l1.sh" | tee "$tmp/console.log" | grep --line-buffered '^BENCH-' >&2 || true
cp "$tmp/console.log" "${BENCH_CONSOLE:-/tmp/bench-snapshot-console.log}"

python3 - "$tmp/console.log" <<'PY'
import re, statistics, sys
snap, rest = {}, {}
for line in open(sys.argv[1], errors="replace"):
    f = line.split()
    if len(f) < 5 or f[0] not in ("BENCH-SNAP", "BENCH-RESTORE"):
        continue
    vmm, mem, t0, t1 = f[1], int(f[2]), float(f[3]), float(f[4])
    if f[0] == "BENCH-SNAP":
        own = float(f[5]) if f[5] != "-" else None
        snap.setdefault((vmm, mem), []).append(((t1 - t0) * 1000, own, int(f[6]), f[7], int(f[8])))
    else:
        to_running = float(f[5]) if f[5] != "-" else (float(f[6]) - t0) * 1000
        rest.setdefault((vmm, mem), []).append((to_running, (t1 - t0) * 1000))
def mm(xs):
    return f"median {statistics.median(xs):8.1f}  min {min(xs):8.1f}"
if not snap:
    sys.exit("bench-snapshot: no complete runs (see the console above)")
for mem in (256, 1024):
    print(f"--- {mem} MiB guest (lab, L1 VMM, TCG-inflated; ms) ---")
    for vmm in ("nvmm", "qemu"):
        s, r = snap.get((vmm, mem), []), rest.get((vmm, mem), [])
        if not s or not r:
            print(f"{vmm}: no complete runs")
            continue
        print(f"{vmm}: {len(s)} snapshots, {len(r)} restores")
        print(f"  snapshot (wall)            {mm([x[0] for x in s])}")
        if s[0][1] is not None:
            print(f"  snapshot (nvmm's own)      {mm([x[1] for x in s])}")
        print(f"  restore to vCPUs running   {mm([x[0] for x in r])}")
        print(f"  restore to next line       {mm([x[1] for x in r])}")
        print(f"  snapshot on disk           {statistics.median([x[2] for x in s]) / 1024:.1f} MiB", end="")
        if s[0][3] != "-":
            print(f", RAM touched {statistics.median([int(x[3]) for x in s]) / 1024:.1f} MiB, state file {statistics.median([x[4] for x in s])} KiB")
        else:
            print()
    for name, i, src in (("snapshot (wall)", 0, snap), ("restore to vCPUs running", 0, rest), ("restore to next line", 1, rest)):
        n, q = src.get(("nvmm", mem)), src.get(("qemu", mem))
        if n and q:
            print(f"  qemu/nvmm {name:26s} median {statistics.median([x[i] for x in q]) / statistics.median([x[i] for x in n]):6.1f}x  min {min(x[i] for x in q) / min(x[i] for x in n):6.1f}x")
PY
