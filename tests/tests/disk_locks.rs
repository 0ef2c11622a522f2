//! Disk images are locked (OFD locks): one read-write user, or any number of read-only ones. Run on
//! this machine's own /dev/kvm with the tiny guest, which halts and leaves nvmm running.

use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nvmm_tests::{assert_one_line_error, nvmm_bin, scratch_dir, tiny};

struct Setup {
    /// Halts and leaves nvmm running.
    halt: String,
    /// Resets at once: an nvmm that is not refused ends by itself, and the test fails.
    quick: String,
    image: String,
}

fn setup(name: &str) -> Setup {
    let dir = scratch_dir(name);
    let halt = dir.join("halt.elf");
    std::fs::write(&halt, tiny::halt_elf()).unwrap();
    let quick = dir.join("quick.elf");
    tiny::write_elf(&quick);
    let image = dir.join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    Setup { halt: halt.display().to_string(), quick: quick.display().to_string(), image: image.display().to_string() }
}

/// An nvmm running the halting guest with `disks`, killed when dropped.
struct Running(Child);

impl Running {
    /// Starts nvmm and waits until it has taken its locks (its guest runs) or has ended.
    fn start(halt: &str, disks: &[String]) -> Running {
        let mut cmd = Command::new(nvmm_bin());
        cmd.args(["--kernel", halt]);
        for d in disks {
            cmd.args(["--disk", d]);
        }
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let pid = child.id();
        let start = Instant::now();
        // The vCPU thread exists once every disk is open and locked.
        while !std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count() > 2).unwrap_or(true) {
            assert!(start.elapsed() < Duration::from_secs(10), "nvmm did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Running(child)
    }

    fn still_running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rw(image: &str) -> String {
    format!("path={image}")
}

fn ro(image: &str) -> String {
    format!("path={image},readonly=on")
}

#[test]
fn the_same_image_twice_is_refused() {
    let s = setup("locks-twice");
    let expected = format!("disk image {} is in use: locked for writing through an open file description", s.image);
    assert_one_line_error(&[], &["--kernel", &s.quick, "--disk", &rw(&s.image), "--disk", &rw(&s.image)], &expected);
    assert_one_line_error(&[], &["--kernel", &s.quick, "--disk", &rw(&s.image), "--disk", &ro(&s.image)], &expected);
}

#[test]
fn a_second_nvmm_on_an_image_in_use_is_refused() {
    let s = setup("locks-second");
    let mut first = Running::start(&s.halt, &[rw(&s.image)]);
    assert!(first.still_running());
    for disk in [rw(&s.image), ro(&s.image)] {
        assert_one_line_error(&[], &["--kernel", &s.quick, "--disk", &disk], &format!("disk image {} is in use", s.image));
    }
    assert!(first.still_running());
}

#[test]
fn read_only_users_share_an_image_and_keep_writers_out() {
    let s = setup("locks-readers");
    let mut a = Running::start(&s.halt, &[ro(&s.image)]);
    let mut b = Running::start(&s.halt, &[ro(&s.image), ro(&s.image)]);
    assert!(a.still_running() && b.still_running(), "two read-only users must run together");
    assert_one_line_error(&[], &["--kernel", &s.quick, "--disk", &rw(&s.image)], "is in use: locked for reading");
}

/// A classic POSIX lock (what many tools take) names its process.
#[test]
fn a_posix_lock_names_its_holder() {
    let s = setup("locks-posix");
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&s.image).unwrap();
    // SAFETY: flock is a plain C struct, valid when zeroed.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_SETLK reads the flock struct, which outlives the call; the fd is open.
    assert_eq!(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &fl) }, 0, "F_SETLK");
    let expected = format!("locked for writing by process {}", std::process::id());
    assert_one_line_error(&[], &["--kernel", &s.quick, "--disk", &ro(&s.image)], &expected);
}
