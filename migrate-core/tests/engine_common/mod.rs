//! Shared fixtures for the engine tests: a recording destination wrapper, a fault-injecting
//! TCP proxy, and a watchdog so no test can hang.

#![allow(dead_code)]

use migrate_core::Result;
use migrate_core::pages::page_hashes;
use migrate_core::software_guest::SoftwareGuest;
use migrate_core::vm::{GuestMemory, IncomingVm};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Runs `f` on a thread; panics if it does not finish within `secs`.
pub fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(_) => {
            if h.is_finished() {
                // The closure panicked: surface its panic.
                std::panic::resume_unwind(h.join().expect_err("no value and no panic"));
            }
            panic!("test did not finish within {secs} s")
        }
    }
}

/// The source guest was resumed and runs: its counter advances within 20 s.
pub fn assert_runs(src: &SoftwareGuest) {
    assert!(src.is_running(), "source not resumed");
    let c = src.counter();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while src.counter() <= c {
        assert!(
            std::time::Instant::now() < deadline,
            "source guest does not advance"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A destination guest that records a hash of every page at the moment it is resumed
/// (i.e. exactly what migration delivered), and whether it was ever resumed.
pub struct Recorded {
    pub guest: SoftwareGuest,
    pub hashes_at_resume: Mutex<Option<Vec<u64>>>,
    pub counter_at_resume: AtomicU64,
    pub resumed: Arc<AtomicBool>,
}

impl Recorded {
    pub fn new(guest: SoftwareGuest, resumed: Arc<AtomicBool>) -> Self {
        Recorded {
            guest,
            hashes_at_resume: Mutex::new(None),
            counter_at_resume: AtomicU64::new(0),
            resumed,
        }
    }
}

impl IncomingVm for Recorded {
    fn memory(&self) -> &GuestMemory {
        IncomingVm::memory(&self.guest)
    }
    fn restore_state(&self, state: &[u8]) -> Result<()> {
        self.guest.restore_state(state)
    }
    fn resume(&self) -> Result<()> {
        *self.hashes_at_resume.lock().unwrap() =
            Some(page_hashes(IncomingVm::memory(&self.guest))?);
        self.counter_at_resume
            .store(self.guest.counter(), Ordering::SeqCst);
        self.resumed.store(true, Ordering::SeqCst);
        IncomingVm::resume(&self.guest)
    }
}

/// What the proxy does to the traffic.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Forward everything.
    None,
    /// After `after` bytes source->destination on connection `conn` (0 = control, 1.. =
    /// memory), close every connection on both sides: the destination vanished.
    KillAll { conn: usize, after: u64 },
    /// After `after` bytes source->destination on connection `conn`, close that connection only.
    CutOne { conn: usize, after: u64 },
    /// Forward only the first `after` bytes destination->source on connection `conn`; swallow
    /// the rest, keeping the connection open (replies "never arrive").
    SwallowReplies { conn: usize, after: u64 },
    /// Invert one byte source->destination on connection `conn`, `after` bytes into it.
    FlipByte { conn: usize, after: u64 },
}

/// A TCP proxy in front of a destination, injecting one fault.
pub struct Proxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    all: Arc<Mutex<Vec<TcpStream>>>,
    /// Every byte sent source->destination, all connections (what a wiretap sees).
    pub seen: Arc<Mutex<Vec<u8>>>,
}

impl Proxy {
    pub fn start(target: SocketAddr, fault: Fault) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let all: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
        let (stop2, all2, seen2) = (stop.clone(), all.clone(), seen.clone());
        std::thread::spawn(move || {
            let mut index = 0;
            while !stop2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        let Ok(d) = TcpStream::connect(target) else {
                            break;
                        };
                        {
                            let mut a = all2.lock().unwrap();
                            a.push(c.try_clone().unwrap());
                            a.push(d.try_clone().unwrap());
                        }
                        pump(index, c, d, fault, all2.clone(), seen2.clone());
                        index += 1;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Proxy {
            addr,
            stop,
            all,
            seen,
        }
    }

    fn kill_all(all: &Mutex<Vec<TcpStream>>) {
        for s in all.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        Proxy::kill_all(&self.all);
    }
}

fn pump(
    index: usize,
    client: TcpStream,
    dest: TcpStream,
    fault: Fault,
    all: Arc<Mutex<Vec<TcpStream>>>,
    seen: Arc<Mutex<Vec<u8>>>,
) {
    let dir = |mut from: TcpStream, mut to: TcpStream, upstream: bool| {
        let (all, seen) = (all.clone(), seen.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            let mut moved = 0u64;
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut fwd = n;
                match fault {
                    Fault::KillAll { conn, after } | Fault::CutOne { conn, after }
                        if upstream && conn == index && moved + n as u64 >= after =>
                    {
                        fwd = (after.saturating_sub(moved)) as usize;
                        let _ = to.write_all(&buf[..fwd]);
                        if matches!(fault, Fault::KillAll { .. }) {
                            Proxy::kill_all(&all);
                        } else {
                            let _ = from.shutdown(Shutdown::Both);
                            let _ = to.shutdown(Shutdown::Both);
                        }
                        return;
                    }
                    Fault::SwallowReplies { conn, after } if !upstream && conn == index => {
                        fwd = (after.saturating_sub(moved)).min(n as u64) as usize;
                    }
                    Fault::FlipByte { conn, after }
                        if upstream
                            && conn == index
                            && (moved..moved + n as u64).contains(&after) =>
                    {
                        buf[(after - moved) as usize] ^= 0xff;
                    }
                    _ => {}
                }
                if upstream {
                    seen.lock().unwrap().extend_from_slice(&buf[..fwd]);
                }
                moved += n as u64;
                if fwd > 0 && to.write_all(&buf[..fwd]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Read);
        });
    };
    dir(client.try_clone().unwrap(), dest.try_clone().unwrap(), true);
    dir(dest, client, false);
}
