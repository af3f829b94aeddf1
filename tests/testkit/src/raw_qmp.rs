//! A minimal QMP line client for fixture tests: one JSON object per line, no typed layer.
//!
//! The `qmp` crate is the real client; this one exists so the fixtures can be proven without it.

use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A negotiated QMP connection over a unix socket.
#[derive(Debug)]
pub struct RawQmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
    next_id: u64,
}

impl RawQmp {
    /// Connects, reads the greeting and enters command mode.
    pub fn connect(path: &Path) -> Result<RawQmp, String> {
        let stream = UnixStream::connect(path).map_err(|e| format!("connect {path:?}: {e}"))?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = RawQmp {
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
            next_id: 0,
        };
        let greeting = qmp.read_line(Duration::from_secs(10))?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_line(&mut self, timeout: Duration) -> Result<Value, String> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("bad QMP line {line:?}: {e}")),
            Err(e) => Err(format!("QMP read: {e}")),
        }
    }

    /// Runs a command; returns its `return` value or QEMU's error as text. Events seen meanwhile
    /// are kept for [`RawQmp::wait_event`].
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"execute": command, "arguments": arguments, "id": id});
        writeln!(self.writer, "{msg}").map_err(|e| format!("QMP write: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("{command}: no reply in 30 s"));
            }
            let v = self.read_line(left)?;
            if v.get("event").is_some() {
                self.events.push_back(v);
            } else if v.get("id") == Some(&json!(id)) {
                if let Some(r) = v.get("return") {
                    return Ok(r.clone());
                }
                return Err(format!("{command}: {}", v["error"]));
            }
        }
    }

    /// Waits for the next event named `name` (including ones already received).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, String> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i).expect("index from position"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no {name} event in {timeout:?}"));
            }
            let v = self.read_line(left)?;
            if v["event"] == name {
                return Ok(v);
            }
            if v.get("event").is_some() {
                self.events.push_back(v);
            }
        }
    }
}
