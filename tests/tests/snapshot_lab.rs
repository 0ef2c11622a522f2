//! Snapshot and restore in the lab, where L1 runs nvmm on a real KVM (nested SVM):
//!
//! - a Linux L2 counting on its console and appending each count to a file on a virtio disk is
//!   paused, saved, its nvmm killed with SIGKILL and restored by a new nvmm: no second boot, the
//!   count goes on, and the writes made after the restore are in the image (read on the host with
//!   debugfs);
//! - the heart: L2 runs with `--nested` and runs nvmm itself for L3, which counts to a target.
//!   L1 saves L2 while L3 runs, kills it and restores it, at several moments; L3 reaches its target,
//!   its last line comes back through every console, every nvmm exits 0, and at least one snapshot
//!   holds L2's vCPU in guest mode (read from the state file with `nvmm snapshot-info`).

use std::path::Path;
use std::process::Command;

use nvmm_tests::guest::{run_cmdline, GuestImage};
use nvmm_tests::net::{IP2_BIN, L1_NETNS_TAP};
use nvmm_tests::{guest_dir, nvmm_bin, scratch_dir, Lab};

/// Shell functions for L1: `counts` counts lines with `$mark` in nvmm's output; every wait is
/// bounded and says what it waited for.
const HELPERS: &str = r#"
out=/tmp/l2.out sock=/tmp/api.sock
# 0 before nvmm's output file exists (the shell that creates it runs in the background).
counts() { c=$(grep -c "$mark" $out 2>/dev/null); echo ${c:-0}; }
wait_for() {
    n=0
    while ! grep -q "$1" $out; do
        usleep 200000; n=$((n+1))
        [ $n -gt 1500 ] && { echo "L1-TIMEOUT waiting for $1"; tail -20 $out; exit 1; }
    done
}
wait_for_counts() {
    n=0
    while [ "$(counts)" -lt "$1" ]; do
        usleep 100000; n=$((n+1))
        [ $n -gt 3000 ] && { echo "L1-TIMEOUT waiting for $1 counts"; tail -20 $out; exit 1; }
    done
}
wait_for_socket() {
    n=0
    while [ ! -S $sock ]; do
        usleep 50000; n=$((n+1))
        [ $n -gt 600 ] && { echo "L1-TIMEOUT waiting for the API socket"; tail -20 $out; exit 1; }
    done
}
# Pause, save into $1, report the snapshot, kill nvmm with SIGKILL, restore with a new nvmm.
cycle() {
    /lab/nvmm ctl $sock pause > /dev/null || { echo L1-PAUSE-FAILED; exit 1; }
    at=$(counts)
    /lab/nvmm ctl $sock snapshot $1 || { echo L1-SNAPSHOT-FAILED; exit 1; }
    echo "L1-SNAPSHOT-INFO $1 $(/lab/nvmm snapshot-info $1 | tr -d ' \n')" | tee -a /tmp/l1.log
    echo "L1-SNAPSHOT-AT=$at"
    echo "L1-SNAPSHOT-DISK $1 $(du -k $1/memory | cut -f1) KiB"
    kill -9 $pid; wait $pid 2>/dev/null
    rm -f $sock
    /lab/nvmm --restore $1 --api-socket $sock >> $out 2>&1 </dev/null &
    pid=$!
    wait_for_socket
}
"#;

/// L2 with an ext4 disk: one count every 100 ms on the console and appended to /mnt/count.log
/// (synced each time), to 60; then unmounts and ends.
const L2_DISK: &str = r#"
echo L2-BOOT-MARKER
mkdir -p /mnt && mount -t ext4 /dev/vda /mnt || { echo L2-MOUNT-FAILED; exit 1; }
i=1
while [ $i -le 60 ]; do
    echo "L2-COUNT $i"
    echo $i >> /mnt/count.log
    sync
    i=$((i+1))
    usleep 100000
done
umount /mnt && echo L2-UMOUNTED
exit 0
"#;

const L1_DISK: &str = r#"
mark=L2-COUNT
/lab/nvmm --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 256M --disk path=/dev/vda --api-socket $sock --cmdline "$CMDLINE" > $out 2>&1 </dev/null &
pid=$!
wait_for_counts 15
cycle /tmp/snap
wait_for L2-UMOUNTED
wait $pid
echo "L1-NVMM-STATUS=$?"
echo "L1-BOOTS=$(grep -c L2-BOOT-MARKER $out)"
grep -q L2-UMOUNTED $out && echo L1-SAW-L2-UMOUNTED
grep L2-COUNT $out | tr -d '\r' | awk '$2 != prev + 1 { print "L1-GAP after " prev ": " $2; bad = 1 } { prev = $2 } END { if (!bad) print "L1-CONSECUTIVE " prev }'
exit 0
"#;

fn mkfs_ext4(image: &Path, size_mib: u32) {
    let _ = std::fs::remove_file(image);
    let st = Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096"]).arg(image).arg(format!("{size_mib}M")).status().expect("run mkfs.ext4");
    assert!(st.success(), "mkfs.ext4 failed");
}

fn debugfs_cat(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs").arg("-R").arg(format!("cat {path}")).arg(image).output().expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_linux_guest_on_a_disk_is_saved_killed_and_restored_without_a_second_boot() {
    let dir = scratch_dir("snap-lab-disk");
    let image = dir.join("disk.img");
    mkfs_ext4(&image, 32);
    let l2 = GuestImage::new(L2_DISK).build("snap-lab-disk");
    let script = format!("CMDLINE='{}'\n{HELPERS}\n{L1_DISK}", run_cmdline(""));
    let run = Lab::new()
        .timeout(900)
        .file(nvmm_bin(), "/lab/nvmm")
        .file(guest_dir().join("bzImage"), "/lab/bzImage")
        .file(l2, "/lab/l2.cpio")
        .drive(&image)
        .run(&script);
    run.assert_status(0);
    let at: u64 = run.value("L1-SNAPSHOT-AT").parse().expect("count at the snapshot");
    assert!((15..60).contains(&at), "saved at count {at}");
    assert_eq!(run.value("L1-BOOTS"), "1", "L2 booted again after the restore");
    run.assert_marker("L1-CONSECUTIVE 60");
    run.assert_marker("L1-SAW-L2-UMOUNTED");
    run.assert_marker("L1-NVMM-STATUS=0");
    // On the host: every count is in the image, those written after the restore included.
    let log = debugfs_cat(&image, "/count.log");
    let counts: Vec<u64> = log.lines().map(|l| l.trim().parse().unwrap_or_else(|_| panic!("bad line {l:?} in {log:?}"))).collect();
    assert_eq!(counts, (1..=60).collect::<Vec<u64>>(), "count.log in the image");
}

/// L3: counts to 40, a busy stretch between two lines (so L2's vCPU is mostly running L3), then
/// prints its final marker.
const L3_COUNTER: &str = r#"
i=1
while [ $i -le 40 ]; do
    echo "L3-COUNT $i"
    j=0; while [ $j -lt 1500 ]; do j=$((j+1)); done
    i=$((i+1))
done
echo L3-FINAL-MARKER
"#;

const L1_NESTED: &str = r#"
mark=L3-COUNT
/lab/nvmm --nested --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 384M --api-socket $sock --cmdline "$CMDLINE" > $out 2>&1 </dev/null &
pid=$!
wait_for_counts 4
cycle /tmp/snap1
wait_for_counts $(( $(counts) + 6 ))
cycle /tmp/snap2
wait_for_counts $(( $(counts) + 5 ))
cycle /tmp/snap3
# More moments, until one finds L2's vCPU running L3 (at most three more).
for k in 4 5 6; do
    grep -q '"guest_mode":true' /tmp/l1.log 2>/dev/null && break
    grep -q L3-FINAL-MARKER $out && break
    wait_for_counts $(( $(counts) + 2 ))
    cycle /tmp/snap$k
done
wait_for L2-NVMM-STATUS
wait $pid
echo "L1-NVMM-STATUS=$?"
echo "L1-L2-BOOTS=$(grep -c L2-BOOT-MARKER $out)"
grep L3-FINAL-MARKER $out | head -1 | sed 's/^/L1-SAW /'
grep L2-NVMM-STATUS $out | head -1 | sed 's/^/L1-SAW /'
grep L3-COUNT $out | tr -d '\r' | awk '$2 != prev + 1 { print "L1-GAP after " prev ": " $2; bad = 1 } { prev = $2 } END { if (!bad) print "L1-CONSECUTIVE " prev }'
exit 0
"#;

#[test]
fn l2_saved_and_restored_three_times_while_its_l3_runs_and_l3_finishes() {
    let l3 = GuestImage::new(L3_COUNTER).build("snap-lab-l3");
    let l2_script = format!(
        "echo L2-BOOT-MARKER\n/lab/nvmm --kernel /lab/bzImage --initrd /lab/l3.cpio --mem 96M --cmdline '{}' </dev/null\necho L2-NVMM-STATUS=$?\n",
        run_cmdline("")
    );
    let l2 = GuestImage::new(&l2_script)
        .file(nvmm_bin(), "/lab/nvmm")
        .file(guest_dir().join("bzImage"), "/lab/bzImage")
        .file(&l3, "/lab/l3.cpio")
        .build("snap-lab-l2");
    let script = format!("CMDLINE='{}'\n{HELPERS}\n{L1_NESTED}", run_cmdline(""));
    let run = Lab::new()
        .timeout(1200)
        .mem_mib(3072)
        .append("nvmm.layer=1")
        .file(nvmm_bin(), "/lab/nvmm")
        .file(guest_dir().join("bzImage"), "/lab/bzImage")
        .file(l2, "/lab/l2.cpio")
        .run(&script);
    run.assert_status(0);
    let snapshots: Vec<&str> = run.output.lines().filter(|l| l.contains("L1-SNAPSHOT-INFO")).collect();
    assert!(snapshots.len() >= 3, "{} snapshots:\n{}", snapshots.len(), run.tail(40));
    eprintln!("{}", snapshots.join("\n"));
    assert!(snapshots.iter().any(|l| l.contains("\"guest_mode\":true")), "no snapshot holds L2's vCPU in guest mode:\n{}", snapshots.join("\n"));
    // Each at a different moment.
    let moments: Vec<&str> = run.output.lines().filter_map(|l| l.trim().strip_prefix("L1-SNAPSHOT-AT=")).collect();
    let mut distinct = moments.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), moments.len(), "two snapshots at the same count: {moments:?}");
    run.assert_marker("L1-SAW L3-FINAL-MARKER");
    run.assert_marker("L1-SAW L2-NVMM-STATUS=0");
    run.assert_marker("L1-CONSECUTIVE 40");
    assert_eq!(run.value("L1-L2-BOOTS"), "1", "L2 booted again after a restore");
    run.assert_marker("L1-NVMM-STATUS=0");
}

/// L1, after [`L1_NETNS_TAP`] (a namespace of its own with a persistent TAP and 10.77.0.1/24): two
/// one-shot TCP servers, each sending 1 MiB of random bytes, and nvmm in the namespace.
const L1_NET: &str = r#"
for p in 5001 5002; do
    dd if=/dev/urandom of=/tmp/$p.bin bs=64k count=16 2>/dev/null
    echo "L1-SHA-$p=$(sha256sum /tmp/$p.bin | cut -d' ' -f1)"
    $IP netns exec $NS nc -l -p $p -e cat /tmp/$p.bin &
done
mark=L2-TICK
$IP netns exec $NS /lab/nvmm --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 256M --net tap=nvtap0 --api-socket $sock --cmdline "$CMDLINE" > $out 2>&1 </dev/null &
pid=$!
wait_for L2-SHA-5001
wait_for_counts 5
/lab/nvmm ctl $sock pause > /dev/null || exit 1
/lab/nvmm ctl $sock snapshot /tmp/snap || exit 1
kill -9 $pid; wait $pid 2>/dev/null
rm -f $sock
$IP netns exec $NS /lab/nvmm --restore /tmp/snap --api-socket $sock >> $out 2>&1 </dev/null &
pid=$!
wait_for L2-DONE
wait $pid
echo "L1-NVMM-STATUS=$?"
echo "L1-BOOTS=$(grep -c L2-BOOT-MARKER $out)"
grep -E 'L2-SHA-|L2-TICKS-AT' $out | tr -d '\r' | sed 's/^/L1-SAW-/'
exit 0
"#;

/// L2: one transfer, then ticks (the snapshot falls among them), then a second transfer on a new
/// connection, which needs the restored virtio-net and the reopened TAP.
const L2_NET: &str = r#"
echo L2-BOOT-MARKER
ip link set eth0 up
ip addr add 10.77.0.2/24 dev eth0
echo "L2-SHA-5001=$(nc 10.77.0.1 5001 </dev/null | sha256sum | cut -d' ' -f1)"
i=1
while [ $i -le 30 ]; do echo "L2-TICK $i"; i=$((i+1)); usleep 100000; done
echo "L2-SHA-5002=$(nc 10.77.0.1 5002 </dev/null | sha256sum | cut -d' ' -f1)"
echo L2-DONE
"#;

#[test]
fn tcp_over_virtio_net_works_again_after_a_restore() {
    let l2 = GuestImage::new(L2_NET).build("snap-lab-net");
    let script = format!("CMDLINE='{}'\n{HELPERS}\n{L1_NETNS_TAP}{L1_NET}", run_cmdline(""));
    let run = Lab::new()
        .timeout(900)
        // One L1 vCPU, as the virtio-net lab test explains (multi-threaded TCG resets L2 now and then).
        .cpus(1)
        .bin(IP2_BIN)
        .file(nvmm_bin(), "/lab/nvmm")
        .file(guest_dir().join("bzImage"), "/lab/bzImage")
        .file(l2, "/lab/l2.cpio")
        .run(&script);
    run.assert_status(0);
    for port in ["5001", "5002"] {
        let sent = run.value(&format!("L1-SHA-{port}"));
        assert_eq!(sent.len(), 64, "no SHA-256 for port {port}");
        assert_eq!(run.value(&format!("L1-SAW-L2-SHA-{port}")), sent, "port {port}: L2 received other bytes");
    }
    assert_eq!(run.value("L1-BOOTS"), "1", "L2 booted again after the restore");
    run.assert_marker("L1-NVMM-STATUS=0");
}
