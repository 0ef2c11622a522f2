//! A channel into an event-loop thread: the sender posts a message and writes an eventfd that the
//! loop's epoll watches, so a loop blocked in `epoll_wait` wakes up and reads its messages between
//! two dispatch rounds. Device loops get their park/unpark requests this way, and the main loop
//! the API server's requests.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

/// The sending side.
pub struct Mailbox<T> {
    sender: Sender<T>,
    wake: EventFd,
}

/// The receiving side, owned by the loop's thread.
pub struct Inbox<T> {
    receiver: Receiver<T>,
    wake: EventFd,
}

/// A new channel and its wake-up eventfd.
pub fn mailbox<T>() -> io::Result<(Mailbox<T>, Inbox<T>)> {
    let wake = EventFd::new(libc::EFD_NONBLOCK)?;
    let (sender, receiver) = mpsc::channel();
    Ok((Mailbox { sender, wake: wake.try_clone()? }, Inbox { receiver, wake }))
}

/// The receiving thread has ended.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the receiving event loop has ended")]
pub struct Closed;

impl<T> Mailbox<T> {
    /// Posts `message` and wakes the loop. The message is queued before the eventfd is written, so
    /// a loop that wakes up always finds it.
    pub fn send(&self, message: T) -> Result<(), Closed> {
        self.sender.send(message).map_err(|_| Closed)?;
        // A full eventfd counter is still readable, so a failed write cannot lose the wake-up.
        let _ = self.wake.write(1);
        Ok(())
    }
}

impl<T> Inbox<T> {
    /// The next message if one is waiting; `Err(Closed)` once every sender is gone.
    pub fn try_recv(&self) -> Result<Option<T>, Closed> {
        match self.receiver.try_recv() {
            Ok(m) => Ok(Some(m)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(Closed),
        }
    }

    /// Blocks until a message comes (a parked loop waits here, using no CPU).
    pub fn recv(&self) -> Result<T, Closed> {
        self.receiver.recv().map_err(|_| Closed)
    }

    /// The subscriber to add to the loop's event manager: it only drains the eventfd, so that
    /// `EventManager::run` returns and the loop looks at its messages.
    pub fn wakeup(&self) -> io::Result<Wakeup> {
        Ok(Wakeup(self.wake.try_clone()?))
    }
}

/// Drains the mailbox's eventfd when it fires.
pub struct Wakeup(EventFd);

impl MutEventSubscriber for Wakeup {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch a mailbox eventfd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Non-blocking: a wake-up already drained reads EAGAIN, which changes nothing.
        let _ = self.0.read();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};

    use super::*;

    #[test]
    fn a_message_wakes_the_loop_and_is_there_to_read() {
        let (tx, rx) = mailbox::<u32>().unwrap();
        let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        events.add_subscriber(Arc::new(Mutex::new(rx.wakeup().unwrap())));
        assert_eq!(events.run_with_timeout(0).unwrap(), 0);
        assert_eq!(rx.try_recv(), Ok(None));
        tx.send(7).unwrap();
        tx.send(8).unwrap();
        assert_eq!(events.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(rx.try_recv(), Ok(Some(7)));
        assert_eq!(rx.recv(), Ok(8));
        // Drained: the loop would sleep again.
        assert_eq!(events.run_with_timeout(0).unwrap(), 0);
        drop(tx);
        assert_eq!(rx.try_recv(), Err(Closed));
    }

    #[test]
    fn sending_to_a_dropped_inbox_fails() {
        let (tx, rx) = mailbox::<()>().unwrap();
        drop(rx);
        assert_eq!(tx.send(()), Err(Closed));
    }
}
