//! The RTC's event handler: a timer on the main event loop, armed for the next interrupt the guest
//! enabled (the alarm, the update), at which it lets the RTC account for the time, as an access
//! would. It is also what wakes a guest asleep in S3: its vCPUs make no accesses then.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::CmosRtc;

/// A zero duration would disarm the timer: an interrupt due now fires after this.
const SOONEST: Duration = Duration::from_micros(1);

/// `Events::data` of each source.
const TIMER: u32 = 0;
const REARM: u32 = 1;

pub struct RtcTimer {
    rtc: Arc<Mutex<CmosRtc>>,
    timer: TimerFd,
    /// The RTC writes it (its `rearm` line) when the guest changes what is due when.
    rearm: EventFd,
    /// Set once arming failed: the timer is then off the loop, which would otherwise spin on it.
    broken: bool,
}

impl RtcTimer {
    pub fn new(rtc: Arc<Mutex<CmosRtc>>, rearm: EventFd) -> std::io::Result<Self> {
        Ok(Self { rtc, timer: TimerFd::new()?, rearm, broken: false })
    }

    /// Lets the RTC account for the time and arms the timer for what is due next. The timer is
    /// never read: setting it again (`timerfd_settime`) clears its expirations as a read would,
    /// and, unlike a read of a timer re-armed in the same round, cannot block.
    fn arm(&mut self, ops: &mut EventOps) {
        let due = self.rtc.lock().unwrap_or_else(|e| e.into_inner()).tick();
        let armed = match due {
            Some(wait) => self.timer.reset(wait.max(SOONEST), None),
            None => self.timer.clear(),
        };
        if let Err(e) = armed {
            log::error!("RTC timer: cannot arm it ({e}); the RTC's interrupts now come only when the guest reads the clock");
            let _ = ops.remove(Events::with_data(&self.timer, TIMER, EventSet::IN));
            self.broken = true;
        }
    }
}

impl MutEventSubscriber for RtcTimer {
    fn init(&mut self, ops: &mut EventOps) {
        for events in [Events::with_data(&self.timer, TIMER, EventSet::IN), Events::with_data(&self.rearm, REARM, EventSet::IN)] {
            if let Err(e) = ops.add(events) {
                log::error!("RTC timer: cannot watch it: {e:?}");
            }
        }
        self.arm(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == REARM {
            let _ = self.rearm.read();
        }
        if !self.broken {
            self.arm(ops);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::cmos_rtc::{HostClock, RtcLines, ALARM_DONT_CARE, B_24_HOUR, B_AIE, HOURS_ALARM, MINUTES_ALARM, REG_B, SECONDS_ALARM};
    use crate::trigger::EventFdTrigger;
    use event_manager::{EventManager, SubscriberOps};

    fn eventfd() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    /// With the alarm set to match every second and AIE on, the timer alone (no access) raises the
    /// alarm and IRQ 8 within about a second.
    #[test]
    fn the_timer_fires_the_alarm_without_an_access() {
        let (irq, rearm) = (eventfd(), eventfd());
        let (alarm_tx, alarm_rx) = std::sync::mpsc::channel();
        let lines = RtcLines {
            irq: EventFdTrigger(irq.try_clone().unwrap()),
            rearm: EventFdTrigger(rearm.try_clone().unwrap()),
            alarm: Box::new(move || {
                let _ = alarm_tx.send(());
            }),
        };
        let rtc = Arc::new(Mutex::new(CmosRtc::new(Box::new(HostClock::new()), lines)));
        {
            let mut r = rtc.lock().unwrap();
            for (reg, value) in [(SECONDS_ALARM, ALARM_DONT_CARE), (MINUTES_ALARM, ALARM_DONT_CARE), (HOURS_ALARM, ALARM_DONT_CARE), (REG_B, B_24_HOUR | B_AIE)] {
                r.write(0, &[reg]);
                r.write(1, &[value]);
            }
        }
        let mut events: EventManager<Arc<Mutex<RtcTimer>>> = EventManager::new().unwrap();
        events.add_subscriber(Arc::new(Mutex::new(RtcTimer::new(rtc.clone(), rearm).unwrap())));
        let start = std::time::Instant::now();
        while alarm_rx.try_recv().is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "no alarm from the timer");
            events.run_with_timeout(100).unwrap();
        }
        assert_eq!(irq.read().unwrap(), 1);
    }
}
