//! An nvmm process running on this host with an API socket: its console lines are collected as
//! they come, it is driven with `nvmm ctl`, and it is killed on drop if a test fails halfway.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::{nvmm_bin, run_nvmm, tiny};

/// How long any wait here lasts before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// An nvmm process with an API socket, its console lines collected as they come. Killed on drop.
pub struct Nvmm {
    child: Child,
    socket: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Nvmm {
    /// The counting tiny guest booted fresh in `dir` (written there as `counter.elf`), with
    /// `extra` arguments and the socket `dir/<name>.sock`.
    pub fn boot_counter(dir: &Path, name: &str, extra: &[&str]) -> Nvmm {
        let elf = dir.join("counter.elf");
        tiny::write_counter_elf(&elf);
        let mut args = vec!["--kernel".to_string(), elf.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(dir, name, &args)
    }

    /// A new nvmm restoring `snapshot`, with `extra` arguments and the socket `dir/<name>.sock`.
    pub fn restore(dir: &Path, name: &str, snapshot: &Path, extra: &[&str]) -> Nvmm {
        let mut args = vec!["--restore".to_string(), snapshot.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(dir, name, &args)
    }

    /// nvmm with `args` and `--api-socket dir/<name>.sock` (a stale socket there is removed
    /// first). Returns once the socket exists; panics if nvmm exits before, or after [`WAIT`].
    pub fn spawn(dir: &Path, name: &str, args: &[String]) -> Nvmm {
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let mut child = Command::new(nvmm_bin())
            .args(args)
            .args(["--api-socket", socket.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start nvmm");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let mut vm = Nvmm { child, socket, lines };
        let t = Instant::now();
        while !vm.socket.exists() {
            if let Some(status) = vm.child.try_wait().unwrap() {
                panic!("nvmm {args:?} exited with {status} before serving its socket");
            }
            assert!(t.elapsed() < WAIT, "no socket at {}", vm.socket.display());
            thread::sleep(Duration::from_millis(10));
        }
        vm
    }

    /// The API socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The console lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// How many console lines so far.
    pub fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Waits until the guest has printed `n` lines; panics after [`WAIT`].
    pub fn wait_for_lines(&self, n: usize) {
        let t = Instant::now();
        while self.count() < n {
            assert!(t.elapsed() < WAIT, "the guest printed {:?}, waited for {n} lines", self.lines());
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// `nvmm ctl SOCKET args...`: status, stdout, stderr.
    pub fn ctl(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let mut all = vec!["ctl", self.socket.to_str().unwrap()];
        all.extend_from_slice(args);
        run_nvmm(&[], &all)
    }

    /// `nvmm ctl` that must succeed; its JSON answer.
    pub fn ctl_ok(&self, args: &[&str]) -> serde_json::Value {
        let (code, out, err) = self.ctl(args);
        assert_eq!(code, Some(0), "ctl {args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {args:?} printed {out:?}: {e}"))
    }

    /// `nvmm ctl SOCKET snapshot DEST` that must succeed; its JSON answer.
    pub fn snapshot(&self, dest: &Path) -> serde_json::Value {
        self.ctl_ok(&["snapshot", dest.to_str().unwrap()])
    }

    /// utime + stime of nvmm's thread named `thread` (e.g. `vcpu0`), in clock ticks.
    pub fn thread_cpu_ticks(&self, thread: &str) -> u64 {
        let tasks = PathBuf::from(format!("/proc/{}/task", self.child.id()));
        for task in std::fs::read_dir(&tasks).unwrap() {
            let dir = task.unwrap().path();
            if std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim() == thread {
                let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
                // Fields after the ")" that closes the name: state is field 3, utime 14, stime 15.
                let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
                return rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
            }
        }
        panic!("no {thread} thread in {}", tasks.display());
    }

    /// Waits for nvmm to exit by itself; its status. Panics after [`WAIT`].
    pub fn wait_for_exit(mut self) -> Option<i32> {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(t.elapsed() < WAIT, "nvmm did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nvmm ctl shutdown`, which must answer "shut down", then nvmm must exit with status 0.
    pub fn shutdown(self) {
        assert_eq!(self.ctl_ok(&["shutdown"])["state"], "shut down");
        assert_eq!(self.wait_for_exit(), Some(0));
    }

    /// SIGKILL, and reaps it.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Nvmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
