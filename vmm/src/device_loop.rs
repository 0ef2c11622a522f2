//! A device's event loop on a thread of its own, which the VMM can park and unpark.
//!
//! Parking happens between two dispatch rounds of the event manager. That is a request boundary:
//! each device completes every request it takes within one `process()` call (virtio-blk reads or
//! writes the image and puts the request on the used ring before it returns), so a parked loop has
//! no request half done. Work that arrives while parked waits in the kernel: a queue notification
//! keeps its eventfd readable and a frame stays in the TAP, and both are seen after unparking.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};

use crate::devices::Subscriber;
use crate::mailbox::{mailbox, Inbox, Mailbox};
use crate::seccomp::ThreadKind;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start the event loop of {name}: {msg}")]
    Start { name: String, msg: String },
    #[error("the event loop of {0} has ended")]
    Gone(String),
    #[error("the event loop of {name} did not answer within {timeout:?}")]
    NoAnswer { name: String, timeout: Duration },
}

/// What the VMM asks of a loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Park,
    Unpark,
    Stop,
}

/// What a loop answers once it has done it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Parked,
    Running,
}

/// The VMM's handle on one device loop.
pub struct DeviceLoop {
    name: String,
    requests: Mailbox<Request>,
    answers: Receiver<Answer>,
    thread: Option<JoinHandle<()>>,
}

/// Starts a thread named `name` that serves `subscribers` until stopped.
pub fn spawn(name: &str, subscribers: Vec<Subscriber>) -> Result<DeviceLoop, Error> {
    spawn_confined(name, None, subscribers)
}

/// [`spawn`], the thread confined by the seccomp filter of `kind` before it serves anything.
pub fn spawn_confined(name: &str, kind: Option<ThreadKind>, subscribers: Vec<Subscriber>) -> Result<DeviceLoop, Error> {
    let start = |msg: String| Error::Start { name: name.to_string(), msg };
    let mut events: EventManager<Subscriber> = EventManager::new().map_err(|e| start(format!("{e:?}")))?;
    let (requests, inbox) = mailbox().map_err(|e| start(e.to_string()))?;
    events.add_subscriber(Arc::new(Mutex::new(inbox.wakeup().map_err(|e| start(e.to_string()))?)));
    for s in subscribers {
        events.add_subscriber(s);
    }
    let (answer, answers) = mpsc::channel();
    let thread_name = name.to_string();
    let thread = thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Some(kind) = kind {
                crate::seccomp::enter_or_exit(kind, &thread_name);
            }
            serve(&thread_name, events, &inbox, &answer)
        })
        .map_err(|e| start(e.to_string()))?;
    Ok(DeviceLoop { name: name.to_string(), requests, answers, thread: Some(thread) })
}

/// The loop: dispatch, then read the mailbox. Returns when stopped or when the VMM is gone.
fn serve(name: &str, mut events: EventManager<Subscriber>, inbox: &Inbox<Request>, answer: &Sender<Answer>) {
    loop {
        if let Err(e) = events.run() {
            log::error!("{name}: event loop stopped: {e:?}");
            return;
        }
        loop {
            let request = match inbox.try_recv() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(_) => return,
            };
            match request {
                Request::Park => {
                    let _ = answer.send(Answer::Parked);
                    if !parked(inbox, answer) {
                        return;
                    }
                }
                Request::Unpark => {
                    let _ = answer.send(Answer::Running);
                }
                Request::Stop => return,
            }
        }
    }
}

/// Sleeps in `recv()` (no CPU, no dispatch) until unparked. False when told to stop, or when the
/// VMM is gone.
fn parked(inbox: &Inbox<Request>, answer: &Sender<Answer>) -> bool {
    loop {
        match inbox.recv() {
            Ok(Request::Unpark) => {
                let _ = answer.send(Answer::Running);
                return true;
            }
            Ok(Request::Park) => {
                let _ = answer.send(Answer::Parked);
            }
            Ok(Request::Stop) | Err(_) => return false,
        }
    }
}

impl DeviceLoop {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Parks the loop at its next request boundary; returns once it is parked.
    pub fn park(&self, timeout: Duration) -> Result<(), Error> {
        self.request(Request::Park, Answer::Parked, timeout)
    }

    /// Lets a parked loop run again.
    pub fn unpark(&self, timeout: Duration) -> Result<(), Error> {
        self.request(Request::Unpark, Answer::Running, timeout)
    }

    fn request(&self, request: Request, expected: Answer, timeout: Duration) -> Result<(), Error> {
        // An answer left over from a request that timed out would be taken for this one's.
        while self.answers.try_recv().is_ok() {}
        self.requests.send(request).map_err(|_| Error::Gone(self.name.clone()))?;
        loop {
            match self.answers.recv_timeout(timeout) {
                Ok(a) if a == expected => return Ok(()),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => return Err(Error::NoAnswer { name: self.name.clone(), timeout }),
                Err(RecvTimeoutError::Disconnected) => return Err(Error::Gone(self.name.clone())),
            }
        }
    }

    /// Ends the loop's thread and waits for it, at most `timeout` (a device stuck in a slow
    /// backend call is left to the process exit).
    pub fn stop(mut self, timeout: Duration) -> Result<(), Error> {
        let _ = self.requests.send(Request::Stop);
        // The thread drops its answer sender when it returns.
        loop {
            match self.answers.recv_timeout(timeout) {
                Ok(_) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => return Err(Error::NoAnswer { name: self.name.clone(), timeout }),
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Instant;

    use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    const T: Duration = Duration::from_secs(5);

    /// A device whose every request takes 200 ms, and counts started and finished requests.
    struct Slow {
        kick: EventFd,
        started: Arc<AtomicU32>,
        done: Arc<AtomicU32>,
    }

    impl MutEventSubscriber for Slow {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.kick, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.kick.read();
            self.started.fetch_add(1, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(200));
            self.done.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn slow_loop() -> (DeviceLoop, EventFd, Arc<AtomicU32>, Arc<AtomicU32>) {
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (started, done) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let dev = Slow { kick: kick.try_clone().unwrap(), started: started.clone(), done: done.clone() };
        let l = spawn("test-slow", vec![Arc::new(Mutex::new(dev))]).unwrap();
        (l, kick, started, done)
    }

    fn wait_for(what: impl Fn() -> bool) {
        let t = Instant::now();
        while !what() {
            assert!(t.elapsed() < T, "timed out");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn park_waits_for_the_request_in_flight_and_holds_new_ones() {
        let (l, kick, started, done) = slow_loop();
        kick.write(1).unwrap();
        wait_for(|| started.load(Ordering::SeqCst) == 1);
        l.park(T).unwrap();
        // The request in flight finished before the loop said it was parked.
        assert_eq!(done.load(Ordering::SeqCst), 1);
        kick.write(1).unwrap();
        thread::sleep(Duration::from_millis(300));
        assert_eq!(started.load(Ordering::SeqCst), 1, "a parked loop took a request");
        l.park(T).unwrap();
        l.unpark(T).unwrap();
        wait_for(|| done.load(Ordering::SeqCst) == 2);
        l.unpark(T).unwrap();
        l.stop(T).unwrap();
    }

    #[test]
    fn a_parked_loop_stops_and_a_stopped_one_is_gone() {
        let (l, _kick, _, _) = slow_loop();
        l.park(T).unwrap();
        let name = l.name().to_string();
        l.stop(T).unwrap();
        assert_eq!(name, "test-slow");
    }
}
