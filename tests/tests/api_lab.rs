//! The control API with a real Linux guest, in the lab (L1 runs nvmm on a real KVM): L2 prints a
//! counter every 100 ms; paused for 2 s it prints nothing and its vCPU thread uses no CPU; resumed,
//! the count goes on from the next number; `nvmm ctl shutdown` ends nvmm with status 0. And an L2
//! writing to its disk without a break: once pause has answered, the image does not change.

use nvmm_tests::guest::{run_cmdline, GuestImage};
use nvmm_tests::{guest_dir, nvmm_bin, Lab, LabRun};

const COUNTER: &str = r#"
i=1
while :; do echo "L2-COUNT $i"; i=$((i+1)); usleep 100000; done
"#;

/// Shell functions for the L1 scripts. `counts` counts L2's lines with `$mark`; every wait is
/// bounded.
const HELPERS: &str = r#"
out=/tmp/l2.out sock=/tmp/api.sock
counts() { grep -c "$mark" $out; }
vcpu0_ticks() {
    for t in /proc/$pid/task/*; do
        [ "$(cat $t/comm)" = vcpu0 ] && awk '{print $14 + $15}' $t/stat
    done
}
wait_for_counts() {
    n=0
    while [ "$(counts)" -lt "$1" ]; do
        usleep 200000; n=$((n+1))
        [ $n -gt 1500 ] && { echo "L1-TIMEOUT waiting for $1 counts"; tail -20 $out; exit 1; }
    done
}
"#;

/// Pause and resume the counter.
const L1: &str = r#"
mark=L2-COUNT
# Created before nvmm starts: the background job's own redirection may come after the first count.
: > $out
/lab/nvmm --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 256M --api-socket $sock --cmdline "$CMDLINE" >> $out 2>&1 &
pid=$!
wait_for_counts 10
/lab/nvmm ctl $sock pause || exit 1
usleep 500000
a=$(counts) t1=$(vcpu0_ticks)
sleep 2
b=$(counts) t2=$(vcpu0_ticks)
echo "L1-PAUSED-COUNTS=$a $b"
echo "L1-PAUSED-TICKS=$((t2 - t1))"
/lab/nvmm ctl $sock info
/lab/nvmm ctl $sock resume || exit 1
wait_for_counts $((b + 10))
echo "L1-RESUMED-COUNTS=$(counts)"
grep L2-COUNT $out | tr -d '\r' | awk '$2 != prev + 1 { print "L1-GAP after " prev ": " $2; bad = 1 } { prev = $2 } END { if (!bad) print "L1-CONSECUTIVE" }'
/lab/nvmm ctl $sock shutdown
wait $pid
echo "L1-NVMM-STATUS=$?"
[ -e $sock ] && echo L1-SOCKET-LEFT
exit 0
"#;

/// Runs the L1 script `l1` (after [`HELPERS`]) in the lab, with nvmm, the guest kernel, and an L2
/// image named `name` that runs `l2`. Asserts that the script exits 0 and that L2's count was the
/// same at both ends of the pause (`L1-PAUSED-COUNTS=a b`), else that L2 `did` something while
/// paused. Returns the run and that count.
fn run_with_a_pause(name: &str, l2: &str, l1: &str, did: &str) -> (LabRun, String) {
    let image = GuestImage::new(l2).build(name);
    let script = format!("CMDLINE='{}'\n{HELPERS}\n{l1}", run_cmdline(""));
    let run = Lab::new()
        .file(nvmm_bin(), "/lab/nvmm")
        .file(guest_dir().join("bzImage"), "/lab/bzImage")
        .file(image, "/lab/l2.cpio")
        .run(&script);
    run.assert_status(0);
    let paused = run.value("L1-PAUSED-COUNTS");
    let (a, b) = paused.split_once(' ').expect("two counts");
    assert_eq!(a, b, "L2 {did} while paused");
    (run, b.to_string())
}

#[test]
fn a_paused_linux_guest_prints_nothing_and_resumes_where_it_stopped() {
    let (run, b) = run_with_a_pause("api-pause", COUNTER, L1, "printed");
    let ticks: u64 = run.value("L1-PAUSED-TICKS").parse().expect("ticks");
    assert!(ticks <= 1, "vcpu0 used {ticks} ticks in 2 s paused");
    assert!(run.value("L1-RESUMED-COUNTS").parse::<u64>().unwrap() >= b.parse::<u64>().unwrap() + 10);
    run.assert_marker("\"state\":\"paused\"");
    run.assert_marker("L1-CONSECUTIVE");
    run.assert_marker("L1-NVMM-STATUS=0");
    assert!(!run.has("L1-SOCKET-LEFT"), "the API socket was left behind");
}

/// L2 rewrites the first 512 KiB of its disk in a loop, each pass ending with a flush.
const WRITER: &str = r#"
i=0
while :; do
    dd if=/dev/urandom of=/dev/vda bs=64k count=8 conv=fsync 2>/dev/null || echo L2-DD-FAILED
    i=$((i+1)); echo "L2-WRITES $i"
done
"#;

/// Pause while L2 writes; the image is checksummed right after pause answers and 2 s later.
const L1_DISK: &str = r#"
mark=L2-WRITES
dd if=/dev/zero of=/tmp/disk.img bs=1M count=4 2>/dev/null
: > $out
/lab/nvmm --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 256M --disk path=/tmp/disk.img --api-socket $sock --cmdline "$CMDLINE" >> $out 2>&1 &
pid=$!
wait_for_counts 5
/lab/nvmm ctl $sock pause || exit 1
s1=$(md5sum < /tmp/disk.img) a=$(counts)
sleep 2
s2=$(md5sum < /tmp/disk.img) b=$(counts)
echo "L1-PAUSED-COUNTS=$a $b"
[ "$s1" = "$s2" ] && echo L1-DISK-UNCHANGED
/lab/nvmm ctl $sock resume || exit 1
wait_for_counts $((b + 5))
s3=$(md5sum < /tmp/disk.img)
[ "$s3" != "$s2" ] && echo L1-DISK-WRITTEN-AGAIN
/lab/nvmm ctl $sock shutdown
wait $pid
echo "L1-NVMM-STATUS=$?"
grep -q L2-DD-FAILED $out && echo L1-DD-FAILED
exit 0
"#;

#[test]
fn a_paused_guest_writing_to_its_disk_leaves_the_image_alone() {
    let (run, _) = run_with_a_pause("api-pause-disk", WRITER, L1_DISK, "wrote");
    run.assert_marker("L1-DISK-UNCHANGED");
    run.assert_marker("L1-DISK-WRITTEN-AGAIN");
    run.assert_marker("L1-NVMM-STATUS=0");
    assert!(!run.has("L1-DD-FAILED"), "a write failed in L2");
}
