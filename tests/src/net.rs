//! The network the lab's virtio-net tests give nvmm inside L1.

/// The start of an L1 script: a network namespace of its own, `$NS` (`nvmmnet`), holding a
/// persistent TAP `nvtap0` with the host address 10.77.0.1/24. `$IP` is iproute2's ip (busybox's
/// has no netns or tuntap), which travels as /usr/local/sbin/ip2: put it there with
/// `Lab::bin(IP2_BIN)`. It starts with a newline and ends without one, so that the rest of the
/// script, a `r#"` literal whose first line is empty, follows it line for line.
pub const L1_NETNS_TAP: &str = r#"
IP=/usr/local/sbin/ip2
NS=nvmmnet
mkdir -p /var/run/netns /run/netns
$IP netns add $NS || { echo L1-NETNS-FAILED; exit 1; }
$IP -n $NS link set lo up
$IP -n $NS tuntap add dev nvtap0 mode tap || { echo L1-TUNTAP-FAILED; exit 1; }
$IP -n $NS addr add 10.77.0.1/24 dev nvtap0
$IP -n $NS link set nvtap0 up"#;

/// For [`crate::Lab::bin`]: the host's iproute2 ip, at the path [`L1_NETNS_TAP`] runs it from.
pub const IP2_BIN: &str = "/sbin/ip:/usr/local/sbin/ip2";
