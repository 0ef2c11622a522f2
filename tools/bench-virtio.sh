#!/bin/bash
# virtio-blk and virtio-net throughput, nvmm against QEMU, side by side inside the lab.
#
# L1 (tools/lab.sh: QEMU TCG with nested SVM, a genuine kvm_amd) runs the same L2 guest (kernel,
# initramfs, 1 vCPU, 256 MiB) alternately under nvmm and under QEMU `-M microvm -accel kvm` with
# `virtio-blk-device` and `virtio-net-device`, on the same disk image (a file in L1's tmpfs) and
# the same TAP device (in a network namespace of its own, 10.77.0.1 in L1, 10.77.0.2 in L2).
# L2 measures, with O_DIRECT on /dev/vda and queue depth 1: sequential read and write (1 MiB
# requests), 4 KiB random reads (IOPS); and with iperf3 against a server in L1's namespace: TCP
# guest to host and host to guest. Prints one table with the ratios nvmm/QEMU (above 1: nvmm is
# faster). Absolute numbers are TCG's and say nothing about hardware; the ratios do.
#
# Usage: tools/bench-virtio.sh [--rounds N] [--seconds S] [--kernel bzImage|vmlinux] [--keep DIR]
#   --rounds N     alternate nvmm and QEMU N times (default 2); the best run of each counts
#   --seconds S    length of each measurement (default 8)
#   --kernel K     L2 kernel for both VMMs (default bzImage; QEMU boots a vmlinux through PVH)
#   --keep DIR     keep the console log and the raw results in DIR
# Needs root (QEMU, TAP). Installs what it needs (QEMU, iperf3, a C compiler).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

rounds=2 seconds=8 kernel=bzImage keep=
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds)  rounds="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        --kernel)  kernel="$2"; shift 2 ;;
        --keep)    keep="$2"; shift 2 ;;
        *) sed -n '2,/^set /{/^#/p}' "$0" >&2; exit 2 ;;
    esac
done
case "$kernel" in bzImage|vmlinux) ;; *) echo "bench-virtio: --kernel is bzImage or vmlinux" >&2; exit 2 ;; esac

ensure_pkgs qemu-system-x86 iperf3 iproute2 gcc libc6-dev cpio >/dev/null
"$REPO_ROOT/tools/build-guest.sh" >/dev/null
nvmm="${NVMM_BIN:-$("$REPO_ROOT/tools/build-nvmm.sh")}"
[ -x "$nvmm" ] || { echo "bench-virtio: no nvmm binary at $nvmm" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# ---- L2's disk benchmark: O_DIRECT, queue depth 1, time-bounded ----------------------------
cat > "$tmp/blkbench.c" <<'EOF'
/* blkbench DEV read|write|randread SECONDS BLOCK: one request at a time, O_DIRECT. Prints
 * "BENCH <mode> <MB/s> <IOPS> <ops>". Sequential modes wrap at the end of the device. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: blkbench DEV MODE SECONDS BLOCK\n"); return 2; }
    const char *mode = argv[2];
    double secs = atof(argv[3]);
    long bs = atol(argv[4]);
    int write = !strcmp(mode, "write"), rnd = !strcmp(mode, "randread");
    int fd = open(argv[1], (write ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (fd < 0) { perror("open"); return 1; }
    off_t size = lseek(fd, 0, SEEK_END);
    long blocks = size / bs;
    if (blocks < 1) { fprintf(stderr, "device too small\n"); return 1; }
    void *buf;
    if (posix_memalign(&buf, 4096, bs)) return 1;
    for (long i = 0; i < bs; i++) ((unsigned char *)buf)[i] = (unsigned char)(i * 131 + 7);
    unsigned long long x = 88172645463325252ULL, ops = 0;
    double start = now(), end = start;
    long next = 0;
    while (end - start < secs) {
        long b;
        if (rnd) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; b = (long)(x % (unsigned long long)blocks); }
        else { b = next; next = (next + 1) % blocks; }
        ssize_t n = write ? pwrite(fd, buf, bs, (off_t)b * bs) : pread(fd, buf, bs, (off_t)b * bs);
        if (n != bs) { perror(write ? "pwrite" : "pread"); return 1; }
        ops++;
        if ((ops & 7) == 0 || bs >= 65536) end = now();
    }
    end = now();
    if (write && fsync(fd)) { perror("fsync"); return 1; }
    double t = end - start;
    printf("BENCH %s %.2f %.1f %llu\n", mode, ops * (double)bs / t / 1e6, ops / t, ops);
    return 0;
}
EOF
cc -static -O2 -o "$tmp/blkbench" "$tmp/blkbench.c"

# ---- L2: the same script under both VMMs -----------------------------------------------------
cat > "$tmp/l2.sh" <<EOF
ip link set eth0 up
ip addr add 10.77.0.2/24 dev eth0
/lab/blkbench /dev/vda read $seconds 1048576
/lab/blkbench /dev/vda write $seconds 1048576
/lab/blkbench /dev/vda randread $seconds 4096
# TCP: iperf3's receiver line, in Mbit/s; -R makes the server (host) send.
for dir in g2h h2g; do
    flag=; [ \$dir = h2g ] && flag=-R
    irq0=\$(awk '/virtio/ { for (i = 2; i <= NF && \$i ~ /^[0-9]+\$/; i++) n += \$i } END { print n + 0 }' /proc/interrupts)
    /usr/bin/iperf3 -c 10.77.0.1 -t $seconds -f m \$flag > /tmp/iperf.\$dir 2>&1
    irq1=\$(awk '/virtio/ { for (i = 2; i <= NF && \$i ~ /^[0-9]+\$/; i++) n += \$i } END { print n + 0 }' /proc/interrupts)
    mbits=\$(awk '/receiver/ { for (i = 1; i <= NF; i++) if (\$i == "Mbits/sec") print \$(i - 1) }' /tmp/iperf.\$dir)
    [ -n "\$mbits" ] || cat /tmp/iperf.\$dir
    echo "BENCH tcp_\$dir \$mbits"
    echo "BENCH irq_\$dir \$((irq1 - irq0))"
done
EOF
"$REPO_ROOT/tools/mkcpio.sh" "$tmp/l2-extra.cpio" --bin iperf3 "$tmp/blkbench:/lab/blkbench" "$tmp/l2.sh:/lab/run.sh"
cp "$GUEST_DIR/initramfs.cpio" "$tmp/l2.cpio"
truncate -s %4 "$tmp/l2.cpio"
cat "$tmp/l2-extra.cpio" >> "$tmp/l2.cpio"

# ---- L1: namespace, TAP, image, iperf3 server, then the VMMs in turn ---------------------------
cmdline="console=ttyS0 reboot=t panic=1 quiet nvmm.run=/lab/run.sh"
cat > "$tmp/l1.sh" <<EOF
IP=/usr/local/sbin/ip2
NS=nvmmbench
mkdir -p /var/run/netns /run/netns
\$IP netns add \$NS || exit 1
\$IP -n \$NS link set lo up
\$IP -n \$NS tuntap add dev nvtap0 mode tap || exit 1
\$IP -n \$NS addr add 10.77.0.1/24 dev nvtap0
\$IP -n \$NS link set nvtap0 up
\$IP netns exec \$NS /usr/bin/iperf3 -s -B 10.77.0.1 -D || exit 1
# The disk: 256 MiB in tmpfs, every page allocated, shared by both VMMs.
dd if=/dev/zero of=/tmp/disk.img bs=1M count=256 2>/dev/null
tap_stats() {
    \$IP netns exec \$NS sh -c 'cd /sys/class/net/nvtap0/statistics && echo \$(cat tx_bytes tx_packets rx_bytes rx_packets)'
}
# A run that hangs (a guest that died mid-test, say) must not hold up the rest: status 143.
limit=$((seconds * 8 + 180))
run_nvmm() {
    timeout \$limit \$IP netns exec \$NS /lab/nvmm --kernel /lab/$kernel --initrd /lab/l2.cpio --mem 256M --cpus 1 \\
        --disk path=/tmp/disk.img --net tap=nvtap0,mac=52:54:00:12:34:56 --cmdline '$cmdline'
}
run_qemu() {
    timeout \$limit \$IP netns exec \$NS qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -smp 1 -m 256 \\
        -nographic -no-reboot -kernel /lab/$kernel -initrd /lab/l2.cpio -append '$cmdline' \\
        -drive file=/tmp/disk.img,format=raw,if=none,id=d0 -device virtio-blk-device,drive=d0 \\
        -netdev tap,id=n0,ifname=nvtap0,script=no,downscript=no \\
        -device virtio-net-device,netdev=n0,mac=52:54:00:12:34:56
}
for round in \$(seq 1 $rounds); do
    for vmm in nvmm qemu; do
        start=\$(date +%s)
        tap0=\$(tap_stats)
        run_\$vmm </dev/null > /tmp/out 2>&1
        status=\$?
        echo "L1-RUN \$vmm round=\$round status=\$status seconds=\$((\$(date +%s) - start))"
        # Frames the TAP carried, and their mean size: GSO at work shows as frames far above 1500.
        set -- \$tap0 \$(tap_stats)
        echo "L1-TAP \$vmm to-guest frames=\$((\$6 - \$2)) mean=\$(( (\$5 - \$1) / (\$6 - \$2 + 1) ))" \
             "from-guest frames=\$((\$8 - \$4)) mean=\$(( (\$7 - \$3) / (\$8 - \$4 + 1) ))"
        grep -q '^BENCH' /tmp/out || tail -n 30 /tmp/out
        tr -d '\r' < /tmp/out | grep '^BENCH' | sed "s/^BENCH/RESULT \$vmm/"
    done
done
EOF

qemu_files=()
for f in qboot.rom linuxboot_dma.bin pvh.bin bios-microvm.bin; do
    qemu_files+=(--file "/usr/share/qemu/$f:/usr/share/qemu/$f")
done
console="$tmp/console"
set +e
# One L1 vCPU, which both VMMs share: with two, the lab now and then loses L2 mid-transfer, and
# sometimes L1 itself, to what looks like a multi-threaded TCG fault (see tests/tests/virtio_net.rs).
"$REPO_ROOT/tools/lab.sh" --cpus 1 --timeout "${BENCH_TIMEOUT:-3000}" \
    --file "$nvmm:/lab/nvmm" --file "$GUEST_DIR/$kernel:/lab/$kernel" --file "$tmp/l2.cpio:/lab/l2.cpio" \
    --bin /sbin/ip:/usr/local/sbin/ip2 --bin iperf3 --bin qemu-system-x86_64 "${qemu_files[@]}" \
    "$tmp/l1.sh" > "$console" 2>&1
rc=$?
set -e
if [ -n "$keep" ]; then mkdir -p "$keep"; cp "$console" "$keep/console.log"; fi
grep -a '^L1-RUN\|^L1-TAP' "$console" >&2 || true
if [ "$rc" != 0 ]; then
    tail -n 40 "$console" >&2
    echo "bench-virtio: the lab run failed (status $rc)" >&2
    exit 1
fi

# ---- the table: best of the rounds for each VMM -----------------------------------------------
tr -d '\r' < "$console" | awk '
    $1 == "RESULT" {
        vmm = $2; m = $3
        v = (m == "randread") ? $5 : $4
        if (v == "") next
        if (m ~ /^irq_/) { irq[vmm, m] = v; next }
        if (!((vmm, m) in best) || v + 0 > best[vmm, m] + 0) best[vmm, m] = v
    }
    END {
        n = split("read write randread tcp_g2h tcp_h2g", ms, " ")
        label["read"] = "disk sequential read (MB/s, 1 MiB, QD1)"
        label["write"] = "disk sequential write (MB/s, 1 MiB, QD1)"
        label["randread"] = "disk 4 KiB random read (IOPS, QD1)"
        label["tcp_g2h"] = "TCP guest to host (Mbit/s)"
        label["tcp_h2g"] = "TCP host to guest (Mbit/s)"
        printf "%-44s %12s %12s %8s\n", "measure", "nvmm", "QEMU", "ratio"
        bad = 0
        for (i = 1; i <= n; i++) {
            m = ms[i]; a = best["nvmm", m]; b = best["qemu", m]
            r = (a != "" && b != "" && b + 0 > 0) ? sprintf("%.2f", a / b) : "n/a"
            if (a == "" || b == "") bad = 1
            printf "%-44s %12s %12s %8s\n", label[m], (a == "" ? "-" : a), (b == "" ? "-" : b), r
        }
        printf "\nvirtio interrupts L2 took during the TCP runs (last round; fewer is cheaper):\n"
        printf "%-44s %12s %12s\n", "guest to host", irq["nvmm", "irq_g2h"], irq["qemu", "irq_g2h"]
        printf "%-44s %12s %12s\n", "host to guest", irq["nvmm", "irq_h2g"], irq["qemu", "irq_h2g"]
        exit bad
    }'
