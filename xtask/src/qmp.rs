//! A minimal QMP (QEMU Machine Protocol) client over a Unix socket, for tests that change the
//! VM while it runs (link down/up) and for the demo's clean shutdown. QMP is line-delimited
//! JSON: every line is parsed with `serde_json` and classified by its top-level key (`return`,
//! `error`, `event` or the `QMP` greeting), never by searching the text, so a reply whose
//! payload happens to contain the word "error" is still a success.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

/// What a QMP exchange can fail with.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket did not accept a connection before the timeout.
    #[error("could not connect to {}: {source}", socket.display())]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The last connection error.
        source: std::io::Error,
    },
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the client was doing.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// QEMU closed the socket (it does so on `quit`, sometimes before replying).
    #[error("QEMU closed the QMP socket")]
    Closed,
    /// The first line was not QMP's greeting.
    #[error("unexpected greeting {0:?}")]
    Greeting(String),
    /// A line that is not a JSON object.
    #[error("unparsable message {line:?}: {reason}")]
    Malformed {
        /// The line as received.
        line: String,
        /// Why it was rejected.
        reason: String,
    },
    /// QEMU answered the command with an `error` reply.
    #[error("{command} failed: {class}: {desc}")]
    Command {
        /// The command that was run.
        command: String,
        /// The error's `class` (e.g. `GenericError`, `DeviceNotFound`).
        class: String,
        /// The error's human-readable `desc`.
        desc: String,
    },
    /// The arguments given to [`Qmp::execute`] are not the text of a JSON object.
    #[error("{command}: invalid arguments: {reason}")]
    Arguments {
        /// The command.
        command: String,
        /// What is wrong with them.
        reason: String,
    },
    /// The run was started without a QMP socket.
    #[error("this run has no QMP socket (use QemuCommand::qmp_socket)")]
    NoSocket,
}

/// One message from QEMU, classified by its top-level key.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// The greeting (`{"QMP": {...}}`), sent once on connect.
    Greeting(Value),
    /// A successful reply: the `return` payload.
    Return(Value),
    /// A failed reply: the `error` object's `class` and `desc`.
    Error {
        /// The error class.
        class: String,
        /// The description.
        desc: String,
    },
    /// An asynchronous event: its name and the whole message.
    Event {
        /// The `event` name (e.g. `NIC_RX_FILTER_CHANGED`).
        name: String,
        /// The message as received.
        message: Value,
    },
}

impl Message {
    /// Parses one line from the QMP socket.
    pub fn parse(line: &str) -> Result<Message, QmpError> {
        let malformed = |reason: String| QmpError::Malformed {
            line: line.to_string(),
            reason,
        };
        let mut object: Map<String, Value> = match serde_json::from_str(line) {
            Ok(Value::Object(object)) => object,
            Ok(_) => return Err(malformed("not a JSON object".to_string())),
            Err(error) => return Err(malformed(error.to_string())),
        };
        if let Some(payload) = object.remove("return") {
            return Ok(Message::Return(payload));
        }
        if let Some(error) = object.get("error") {
            let text = |key: &str| error.get(key).and_then(Value::as_str).map(str::to_string);
            return Ok(Message::Error {
                class: text("class").unwrap_or_else(|| "(no class)".to_string()),
                desc: text("desc").unwrap_or_else(|| error.to_string()),
            });
        }
        if let Some(name) = object.get("event").and_then(Value::as_str) {
            return Ok(Message::Event {
                name: name.to_string(),
                message: Value::Object(object.clone()),
            });
        }
        if let Some(greeting) = object.remove("QMP") {
            return Ok(Message::Greeting(greeting));
        }
        Err(malformed(
            "none of `return`, `error`, `event` or `QMP`".to_string(),
        ))
    }
}

/// A connected QMP session in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to `socket` (retrying until `timeout` while QEMU creates it), reads the greeting
    /// and negotiates capabilities.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(source) if Instant::now() >= deadline => {
                    return Err(QmpError::Connect {
                        socket: socket.to_path_buf(),
                        source,
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        Qmp::handshake(stream, timeout)
    }

    /// Reads the greeting on a connected `stream` and negotiates capabilities; each read waits
    /// at most `timeout` (at least 1 s).
    fn handshake(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        let io = |context: &str| {
            let context = context.to_string();
            move |source| QmpError::Io { context, source }
        };
        stream
            .set_read_timeout(Some(timeout.max(Duration::from_secs(1))))
            .map_err(io("set_read_timeout"))?;
        let writer = stream.try_clone().map_err(io("clone socket"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_line()?;
        match Message::parse(&greeting) {
            Ok(Message::Greeting(_)) => {}
            _ => return Err(QmpError::Greeting(greeting)),
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` with optional `arguments`, the text of a JSON object (e.g.
    /// `{"name":"n0","up":false}`), and returns the reply's `return` payload. The arguments are
    /// parsed here, so a typo fails as [`QmpError::Arguments`] before anything is sent.
    /// Asynchronous events that arrive first are kept (see [`Qmp::events`]); an `error` reply
    /// becomes [`QmpError::Command`] with its class and description.
    pub fn execute(&mut self, command: &str, arguments: Option<&str>) -> Result<Value, QmpError> {
        let arguments = match arguments {
            None => None,
            Some(text) => match serde_json::from_str(text) {
                Ok(object @ Value::Object(_)) => Some(object),
                Ok(_) => {
                    return Err(QmpError::Arguments {
                        command: command.to_string(),
                        reason: format!("{text:?} is not a JSON object"),
                    });
                }
                Err(error) => {
                    return Err(QmpError::Arguments {
                        command: command.to_string(),
                        reason: format!("{text:?}: {error}"),
                    });
                }
            },
        };
        self.execute_value(command, arguments)
    }

    /// [`Qmp::execute`] with the arguments already a JSON value (e.g. built with
    /// `serde_json::json!`).
    pub fn execute_value(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut request = Map::new();
        request.insert("execute".to_string(), Value::from(command));
        if let Some(arguments) = arguments {
            request.insert("arguments".to_string(), arguments);
        }
        let mut line = Value::Object(request).to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Io {
                context: format!("sending {command}"),
                source,
            })?;
        loop {
            match Message::parse(&self.read_line()?)? {
                Message::Return(payload) => return Ok(payload),
                Message::Error { class, desc } => {
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        class,
                        desc,
                    });
                }
                Message::Event { message, .. } => self.events.push(message),
                Message::Greeting(_) => {}
            }
        }
    }

    /// Sets the link state of the NIC whose netdev or device id is `name` (`set_link`).
    pub fn set_link(&mut self, name: &str, up: bool) -> Result<(), QmpError> {
        self.execute_value(
            "set_link",
            Some(serde_json::json!({ "name": name, "up": up })),
        )
        .map(drop)
    }

    /// Asynchronous events received so far.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    fn read_line(&mut self) -> Result<String, QmpError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(QmpError::Closed),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(source) => Err(QmpError::Io {
                context: "reading a response".to_string(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    /// A `return` whose payload holds the string "error" (here a VM named `error` and the run
    /// state `internal-error`): the old text search for `"error"` took it for a failure.
    const RETURN_MENTIONING_ERROR: &str =
        r#"{"return": {"name": "error", "status": "internal-error", "running": false}}"#;

    #[test]
    fn a_return_mentioning_error_is_a_success() {
        assert!(
            RETURN_MENTIONING_ERROR.contains("\"error\""),
            "the case the old parser misread"
        );
        match Message::parse(RETURN_MENTIONING_ERROR) {
            Ok(Message::Return(payload)) => {
                assert_eq!(payload["name"], "error");
                assert_eq!(payload["status"], "internal-error");
            }
            other => panic!("expected a return, got {other:?}"),
        }
    }

    #[test]
    fn an_error_reply_carries_its_class_and_desc() {
        let line = r#"{"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}"#;
        assert_eq!(
            Message::parse(line).ok(),
            Some(Message::Error {
                class: "DeviceNotFound".to_string(),
                desc: "Device 'x' not found".to_string(),
            })
        );
        assert!(matches!(
            Message::parse("not json"),
            Err(QmpError::Malformed { .. })
        ));
        assert!(matches!(
            Message::parse(r#"{"unknown": 1}"#),
            Err(QmpError::Malformed { .. })
        ));
    }

    /// A scripted QEMU on the other end of a socket pair: the greeting, then for each command
    /// the lines in `replies` (events first where QEMU would send them).
    #[test]
    fn execute_skips_events_and_reports_errors() {
        let (client, server) = UnixStream::pair().expect("socket pair");
        let qemu = thread::spawn(move || {
            let mut writer = server.try_clone().expect("clone");
            let mut reader = BufReader::new(server);
            let mut requests = Vec::new();
            let mut send = |line: &str| writeln!(writer, "{line}").expect("write");
            send(r#"{"QMP": {"version": {"qemu": {"major": 7, "minor": 2}}, "capabilities": []}}"#);
            let scripts: [&[&str]; 3] = [
                &[r#"{"return": {}}"#],
                &[
                    r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "NIC_RX_FILTER_CHANGED", "data": {"name": "n0"}}"#,
                    RETURN_MENTIONING_ERROR,
                ],
                &[
                    r#"{"event": "RESUME", "timestamp": {"seconds": 3, "microseconds": 4}}"#,
                    r#"{"error": {"class": "GenericError", "desc": "Device 'nope' not found"}}"#,
                ],
            ];
            for script in scripts {
                let mut request = String::new();
                reader.read_line(&mut request).expect("request");
                requests.push(request.trim_end().to_string());
                for line in script {
                    send(line);
                }
            }
            requests
        });
        let mut qmp = Qmp::handshake(client, Duration::from_secs(5)).expect("handshake");
        let status = qmp.execute("query-status", None).expect("a success");
        assert_eq!(status["status"], "internal-error");
        match qmp.set_link("nope", false) {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "set_link");
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "Device 'nope' not found");
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        assert!(matches!(
            qmp.execute("set_link", Some("{not json")),
            Err(QmpError::Arguments { .. })
        ));
        assert!(matches!(
            qmp.execute("set_link", Some("[1, 2]")),
            Err(QmpError::Arguments { .. })
        ));
        let names: Vec<&str> = qmp
            .events()
            .iter()
            .filter_map(|event| event["event"].as_str())
            .collect();
        assert_eq!(names, ["NIC_RX_FILTER_CHANGED", "RESUME"]);
        let requests = qemu.join().expect("the scripted QEMU");
        assert_eq!(requests[0], r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(requests[1], r#"{"execute":"query-status"}"#);
        let set_link: Value = serde_json::from_str(&requests[2]).expect("JSON request");
        assert_eq!(
            set_link,
            serde_json::json!({"execute": "set_link", "arguments": {"name": "nope", "up": false}})
        );
        drop(qmp);
    }
}
