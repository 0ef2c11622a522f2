//! The control API with a real Linux guest, in the lab (L1 runs nvmm on a real KVM): L2 prints a
//! counter every 100 ms; paused for 2 s it prints nothing and its vCPU thread uses no CPU; resumed,
//! the count goes on from the next number; `nvmm ctl shutdown` ends nvmm with status 0.

use nvmm_tests::guest::{run_cmdline, GuestImage};
use nvmm_tests::{guest_dir, nvmm_bin, Lab};

const COUNTER: &str = r#"
i=1
while :; do echo "L2-COUNT $i"; i=$((i+1)); usleep 100000; done
"#;

/// The L1 script. Every wait is bounded; the output of L2 is kept in a file, shown at the end.
const L1: &str = r#"
out=/tmp/l2.out sock=/tmp/api.sock
counts() { grep -c L2-COUNT $out; }
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
/lab/nvmm --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 256M --api-socket $sock --cmdline "$CMDLINE" > $out 2>&1 &
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

#[test]
fn a_paused_linux_guest_prints_nothing_and_resumes_where_it_stopped() {
    let image = GuestImage::new(COUNTER).build("api-pause");
    let script = format!("CMDLINE='{}'\n{L1}", run_cmdline(""));
    let run = Lab::new()
        .file(nvmm_bin(), "/lab/nvmm")
        .file(guest_dir().join("bzImage"), "/lab/bzImage")
        .file(image, "/lab/l2.cpio")
        .run(&script);
    run.assert_status(0);
    let paused = run.value("L1-PAUSED-COUNTS");
    let (a, b) = paused.split_once(' ').expect("two counts");
    assert_eq!(a, b, "L2 printed while paused");
    let ticks: u64 = run.value("L1-PAUSED-TICKS").parse().expect("ticks");
    assert!(ticks <= 1, "vcpu0 used {ticks} ticks in 2 s paused");
    assert!(run.value("L1-RESUMED-COUNTS").parse::<u64>().unwrap() >= b.parse::<u64>().unwrap() + 10);
    run.assert_marker("\"state\":\"paused\"");
    run.assert_marker("L1-CONSECUTIVE");
    run.assert_marker("L1-NVMM-STATUS=0");
    assert!(!run.has("L1-SOCKET-LEFT"), "the API socket was left behind");
}
