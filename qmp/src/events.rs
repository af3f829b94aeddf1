//! QMP events: the typed view, per-subscriber bounded queues, and waiting for an event.
//!
//! Overflow policy: each subscription queues at most `capacity` events. When a subscriber falls
//! behind, the reader thread discards the *oldest* queued event, counts it
//! ([`Subscription::dropped`]) and logs a warning; it never blocks on a slow subscriber.
//!
//! The connection's own queue ([`crate::Qmp::wait_for_event`]) is shared by every thread that
//! waits on it, so it is an `EventQueue`: waiters sleep on a condition variable, not on a
//! lock, and each takes only the event it wants.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use serde::Deserialize;
use serde_json::Value;

use crate::connection::Shared;
use crate::error::{Error, Result};
use crate::types::{MigrationStatus, ShutdownCause};

/// `MIGRATION`: the migration status changed (needs the `events` capability).
pub const MIGRATION: &str = "MIGRATION";
/// `MIGRATION_PASS`: a new dirty-page pass began (needs the `events` capability).
pub const MIGRATION_PASS: &str = "MIGRATION_PASS";
/// `DEVICE_DELETED`: a device finished unplugging.
pub const DEVICE_DELETED: &str = "DEVICE_DELETED";
/// `STOP`: the vCPUs stopped.
pub const STOP: &str = "STOP";
/// `RESUME`: the vCPUs resumed.
pub const RESUME: &str = "RESUME";
/// `SHUTDOWN`: QEMU is shutting down.
pub const SHUTDOWN: &str = "SHUTDOWN";

/// When QEMU emitted an event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// One event as QEMU sent it. [`Event::kind`] gives the typed view.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name, e.g. `STOP`.
    pub name: String,
    /// The `data` member (`null` when absent).
    pub data: Value,
    /// The `timestamp` member, when present and well-formed.
    pub timestamp: Option<Timestamp>,
}

/// The events other crates act on, typed; anything else (or a known event whose data a newer
/// QEMU changed beyond recognition) is [`EventKind::Other`].
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// `MIGRATION`.
    Migration {
        /// The new status.
        status: MigrationStatus,
    },
    /// `MIGRATION_PASS`.
    MigrationPass {
        /// The pass number.
        pass: u64,
    },
    /// `DEVICE_DELETED`.
    DeviceDeleted {
        /// The device id, when it had one.
        device: Option<String>,
        /// The QOM path.
        path: String,
    },
    /// `STOP`.
    Stop,
    /// `RESUME`.
    Resume,
    /// `SHUTDOWN`.
    Shutdown {
        /// True when the guest asked for it.
        guest: bool,
        /// Why.
        reason: ShutdownCause,
    },
    /// Any other event.
    Other {
        /// Event name.
        name: String,
        /// Event data.
        data: Value,
    },
}

#[derive(Deserialize)]
struct MigrationData {
    status: MigrationStatus,
}

#[derive(Deserialize)]
struct MigrationPassData {
    pass: u64,
}

#[derive(Deserialize)]
struct DeviceDeletedData {
    #[serde(default)]
    device: Option<String>,
    path: String,
}

#[derive(Deserialize)]
struct ShutdownData {
    guest: bool,
    reason: ShutdownCause,
}

impl Event {
    /// Builds an event from a QMP message object that has an `event` member.
    pub(crate) fn from_message(name: String, message: &mut serde_json::Map<String, Value>) -> Self {
        let data = message.remove("data").unwrap_or(Value::Null);
        let timestamp = message
            .remove("timestamp")
            .and_then(|t| serde_json::from_value(t).ok());
        Self {
            name,
            data,
            timestamp,
        }
    }

    /// The typed view of this event.
    pub fn kind(&self) -> EventKind {
        fn parse<T: serde::de::DeserializeOwned>(data: &Value) -> Option<T> {
            T::deserialize(data).ok()
        }
        let typed = match self.name.as_str() {
            MIGRATION => parse::<MigrationData>(&self.data)
                .map(|d| EventKind::Migration { status: d.status }),
            MIGRATION_PASS => parse::<MigrationPassData>(&self.data)
                .map(|d| EventKind::MigrationPass { pass: d.pass }),
            DEVICE_DELETED => {
                parse::<DeviceDeletedData>(&self.data).map(|d| EventKind::DeviceDeleted {
                    device: d.device,
                    path: d.path,
                })
            }
            STOP => Some(EventKind::Stop),
            RESUME => Some(EventKind::Resume),
            SHUTDOWN => parse::<ShutdownData>(&self.data).map(|d| EventKind::Shutdown {
                guest: d.guest,
                reason: d.reason,
            }),
            _ => None,
        };
        typed.unwrap_or_else(|| EventKind::Other {
            name: self.name.clone(),
            data: self.data.clone(),
        })
    }
}

/// Which events a subscription receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventFilter {
    /// Every event.
    All,
    /// Only events with one of these names.
    Names(Vec<String>),
}

impl EventFilter {
    /// A filter for the given event names.
    pub fn names<S: AsRef<str>>(names: &[S]) -> Self {
        Self::Names(names.iter().map(|n| n.as_ref().to_owned()).collect())
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Self::All => true,
            Self::Names(names) => names.iter().any(|n| n == name),
        }
    }
}

/// `Instant::now() + timeout`, saturating at a far future instead of overflowing.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Counters shared between the reader thread and a [`Subscription`].
#[derive(Debug, Default)]
struct SubscriberCounters {
    dropped: AtomicU64,
    closed: AtomicBool,
}

/// The reader thread's end of a subscription or of an [`EventQueue`]. Dropping it (when the
/// connection ends) tells the other end that no more events will come.
pub(crate) struct SubscriberSlot {
    filter: EventFilter,
    sink: Sink,
}

enum Sink {
    Channel {
        sender: Sender<Event>,
        /// A clone of the subscriber's receiver, used only to discard the oldest event on
        /// overflow.
        oldest: Receiver<Event>,
        counters: Arc<SubscriberCounters>,
    },
    Queue(QueueSink),
}

/// Marks its queue closed when dropped.
struct QueueSink(Arc<EventQueue>);

impl Drop for QueueSink {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl SubscriberSlot {
    /// Queues `event` if it matches; returns false when the subscription is gone.
    pub(crate) fn deliver(&self, event: &Event) -> bool {
        let (sender, oldest, counters) = match &self.sink {
            Sink::Channel {
                sender,
                oldest,
                counters,
            } => (sender, oldest, counters),
            Sink::Queue(queue) => {
                if self.filter.matches(&event.name) {
                    queue.0.push(event.clone());
                }
                return true;
            }
        };
        if counters.closed.load(Ordering::Acquire) {
            return false;
        }
        if !self.filter.matches(&event.name) {
            return true;
        }
        let mut event = event.clone();
        loop {
            match sender.try_send(event) {
                Ok(()) => return true,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(back)) => {
                    event = back;
                    if let Ok(old) = oldest.try_recv() {
                        let n = counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                        log::warn!(
                            "QMP subscriber is slow: dropped event {} ({n} so far)",
                            old.name
                        );
                    }
                }
            }
        }
    }
}

/// A queue of every event, shared by any number of waiting threads. Each event is taken by
/// at most one wait; events nobody wants stay queued (up to the capacity, then the oldest is
/// discarded and counted).
pub(crate) struct EventQueue {
    state: Mutex<QueueState>,
    /// Signalled when an event arrives and when the connection ends.
    changed: Condvar,
    capacity: usize,
    dropped: AtomicU64,
}

struct QueueState {
    /// Queued events, each with its arrival number.
    events: VecDeque<(u64, Event)>,
    /// The arrival number of the next event.
    next_seq: u64,
    /// False once the connection ended: no more events will arrive.
    open: bool,
}

impl EventQueue {
    /// A queue receiving every event, and the reader thread's end of it.
    pub(crate) fn new(capacity: usize) -> (Arc<Self>, SubscriberSlot) {
        let queue = Arc::new(Self {
            state: Mutex::new(QueueState {
                events: VecDeque::new(),
                next_seq: 0,
                open: true,
            }),
            changed: Condvar::new(),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
        });
        let slot = SubscriberSlot {
            filter: EventFilter::All,
            sink: Sink::Queue(QueueSink(Arc::clone(&queue))),
        };
        (queue, slot)
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many events were discarded because the queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn push(&self, event: Event) {
        let mut state = self.lock();
        if state.events.len() >= self.capacity {
            if let Some((_, old)) = state.events.pop_front() {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                log::warn!(
                    "QMP event queue is full: dropped event {} ({n} so far)",
                    old.name
                );
            }
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.events.push_back((seq, event));
        drop(state);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.lock().open = false;
        self.changed.notify_all();
    }

    /// Waits for an event named `name` for which `predicate` holds and takes it from the
    /// queue. The queue's lock is held only to look and to take, never across the wait or
    /// while `predicate` runs (it may call into the connection).
    pub(crate) fn wait_for_event(
        &self,
        name: &str,
        mut predicate: impl FnMut(&Event) -> bool,
        timeout: Duration,
        shared: &Shared,
    ) -> Result<Event> {
        let deadline = deadline_after(timeout);
        // Events numbered below this were already offered to `predicate`.
        let mut seen = 0;
        loop {
            let candidates: Vec<(u64, Event)> = {
                let mut state = self.lock();
                while state.next_seq == seen {
                    if !state.open {
                        drop(state);
                        return Err(Error::Disconnected {
                            reason: shared.disconnect_reason(),
                        });
                    }
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    if remaining.is_zero() {
                        return Err(Error::Timeout {
                            what: format!("event {name}"),
                            after: timeout,
                        });
                    }
                    state = self
                        .changed
                        .wait_timeout(state, remaining)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                let fresh = state
                    .events
                    .iter()
                    .filter(|(seq, event)| *seq >= seen && event.name == name)
                    .cloned()
                    .collect();
                seen = state.next_seq;
                fresh
            };
            for (seq, event) in candidates {
                if predicate(&event) {
                    let mut state = self.lock();
                    // Another waiter may have taken it (or overflow discarded it) meanwhile.
                    if let Some(pos) = state.events.iter().position(|(s, _)| *s == seq) {
                        state.events.remove(pos);
                        return Ok(event);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("event {name}"),
                    after: timeout,
                });
            }
        }
    }
}

/// A stream of events matching a filter. Events that arrive while commands are in flight are
/// queued here, so subscribe *before* issuing the command whose event you want.
pub struct Subscription {
    receiver: Receiver<Event>,
    /// Events received while waiting for a different one, kept for later waits.
    stash: VecDeque<Event>,
    capacity: usize,
    counters: Arc<SubscriberCounters>,
    shared: Arc<Shared>,
}

impl Subscription {
    pub(crate) fn new(
        filter: EventFilter,
        capacity: usize,
        shared: Arc<Shared>,
    ) -> (Self, SubscriberSlot) {
        let capacity = capacity.max(1);
        let (sender, receiver) = crossbeam_channel::bounded(capacity);
        let counters = Arc::new(SubscriberCounters::default());
        let slot = SubscriberSlot {
            filter,
            sink: Sink::Channel {
                sender,
                oldest: receiver.clone(),
                counters: Arc::clone(&counters),
            },
        };
        let subscription = Self {
            receiver,
            stash: VecDeque::new(),
            capacity,
            counters,
            shared,
        };
        (subscription, slot)
    }

    /// How many events were discarded because this subscriber fell behind.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// The next event without waiting, if one is queued.
    pub fn try_next(&mut self) -> Option<Event> {
        self.stash
            .pop_front()
            .or_else(|| self.receiver.try_recv().ok())
    }

    /// The next event, waiting at most `timeout`.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Event> {
        if let Some(event) = self.stash.pop_front() {
            return Ok(event);
        }
        self.recv_until(deadline_after(timeout), "any event", timeout)
    }

    /// Waits for an event named `name` for which `predicate` holds. Events that do not match
    /// stay queued for later calls.
    pub fn wait_for_event(
        &mut self,
        name: &str,
        mut predicate: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event> {
        let deadline = deadline_after(timeout);
        let mut wanted = |e: &Event| e.name == name && predicate(e);
        if let Some(pos) = self.stash.iter().position(&mut wanted) {
            return Ok(self.stash.remove(pos).expect("position is in range"));
        }
        let what = format!("event {name}");
        loop {
            let event = self.recv_until(deadline, &what, timeout)?;
            if wanted(&event) {
                return Ok(event);
            }
            if self.stash.len() >= self.capacity {
                self.stash.pop_front();
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
            self.stash.push_back(event);
        }
    }

    fn recv_until(&mut self, deadline: Instant, what: &str, timeout: Duration) -> Result<Event> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match self.receiver.recv_timeout(remaining) {
            Ok(event) => Ok(event),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout {
                what: what.to_owned(),
                after: timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Disconnected {
                reason: self.shared.disconnect_reason(),
            }),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.counters.closed.store(true, Ordering::Release);
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("queued", &(self.receiver.len() + self.stash.len()))
            .field("dropped", &self.dropped())
            .finish()
    }
}
