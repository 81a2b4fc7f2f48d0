//! A minimal QMP (QEMU Machine Protocol) client over a Unix socket, for tests that change the
//! VM while it runs (link down/up). It speaks line-delimited JSON without a JSON library: commands
//! are written as text and a response is the next line holding `"return"` or `"error"`
//! (asynchronous `"event"` lines are collected and skipped).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::Error;

/// A connected QMP session in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<String>,
}

impl Qmp {
    /// Connects to `socket` (retrying until `timeout` while QEMU creates it), reads the greeting
    /// and negotiates capabilities.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, Error> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(error) if Instant::now() >= deadline => {
                    return Err(Error::Qmp(format!(
                        "could not connect to {}: {error}",
                        socket.display()
                    )));
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        let io_error = |what: &str, error: std::io::Error| Error::Qmp(format!("{what}: {error}"));
        stream
            .set_read_timeout(Some(timeout.max(Duration::from_secs(1))))
            .map_err(|e| io_error("set_read_timeout", e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| io_error("clone socket", e))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_line()?;
        if !greeting.contains("\"QMP\"") {
            return Err(Error::Qmp(format!("unexpected greeting {greeting:?}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` with optional `arguments` (a JSON object, e.g. `{"name":"n0","up":false}`)
    /// and returns the raw response line. A QMP `"error"` response becomes [`Error::Qmp`].
    pub fn execute(&mut self, command: &str, arguments: Option<&str>) -> Result<String, Error> {
        let request = match arguments {
            Some(arguments) => format!("{{\"execute\":\"{command}\",\"arguments\":{arguments}}}\n"),
            None => format!("{{\"execute\":\"{command}\"}}\n"),
        };
        self.writer
            .write_all(request.as_bytes())
            .map_err(|e| Error::Qmp(format!("sending {command}: {e}")))?;
        loop {
            let line = self.read_line()?;
            if line.contains("\"event\"") {
                self.events.push(line);
            } else if line.contains("\"error\"") {
                return Err(Error::Qmp(format!("{command} failed: {line}")));
            } else if line.contains("\"return\"") {
                return Ok(line);
            }
        }
    }

    /// Sets the link state of the NIC whose netdev or device id is `name` (`set_link`).
    pub fn set_link(&mut self, name: &str, up: bool) -> Result<(), Error> {
        self.execute(
            "set_link",
            Some(&format!("{{\"name\":\"{name}\",\"up\":{up}}}")),
        )
        .map(drop)
    }

    /// Asynchronous events received so far (raw JSON lines).
    pub fn events(&self) -> &[String] {
        &self.events
    }

    fn read_line(&mut self) -> Result<String, Error> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(Error::Qmp("QEMU closed the QMP socket".to_string())),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(error) => Err(Error::Qmp(format!("reading a response: {error}"))),
        }
    }
}
