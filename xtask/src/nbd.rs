//! NBD from the host's side, for the integration tests (`tests/nbd.rs`) and `cargo xtask demo
//! --nbd`:
//!
//! * the real clients nobody here wrote, installed through the one package installer
//!   ([`ensure_nbd_tools`]: `nbdinfo` and `nbdcopy` from Debian's `libnbd-bin`, `qemu-io` and
//!   `qemu-img` from `qemu-utils`), and run with a wall-clock limit ([`run_tool`]);
//! * a small raw client ([`NbdClient`]) speaking the NBD protocol document's fixed newstyle
//!   handshake (`NBD_OPT_GO`) and simple requests and replies, which can also send the bytes
//!   a real client never would (bad magic, lengths past the end, unknown commands), so that the
//!   tests can show how the server answers them.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::host::{InstallError, ensure_packages};

/// The IANA port of NBD.
pub const NBD_PORT: u16 = 10809;
/// The name of the export Vireo serves.
pub const EXPORT_NAME: &str = "vireo";

/// The real clients the tests and the demo use, and the Debian package of each.
pub const NBD_TOOLS: [(&str, &str); 4] = [
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("qemu-io", "qemu-utils"),
    ("qemu-img", "qemu-utils"),
];

/// Makes sure every program of [`NBD_TOOLS`] is on `PATH`, installing the missing packages
/// as root (otherwise the error names the exact command to run).
pub fn ensure_nbd_tools() -> Result<(), InstallError> {
    ensure_packages(&NBD_TOOLS)
}

/// The URI of the export at `address` (`nbd://10.0.2.15:10809/vireo`).
pub fn nbd_uri(address: SocketAddr) -> String {
    format!("nbd://{address}/{EXPORT_NAME}")
}

/// A finished run of a client program.
#[derive(Debug)]
pub struct ToolRun {
    /// The command as run.
    pub command_line: String,
    /// How it ended.
    pub status: ExitStatus,
    /// What it printed.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
    /// How long it took.
    pub elapsed: Duration,
}

/// Why a client program did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// It could not be started.
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// Why.
        source: io::Error,
    },
    /// It ran past its limit and was killed.
    #[error(
        "`{command}` did not finish within {limit:?} and was killed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    )]
    TimedOut {
        /// The command.
        command: String,
        /// The limit.
        limit: Duration,
        /// What it printed.
        stdout: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// It exited unsuccessfully.
    #[error("`{command}` failed ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}")]
    Failed {
        /// The command.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed.
        stdout: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// The command line of `command`, for messages.
pub fn describe_command(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(crate::shell_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `command` to the end within `limit`, capturing its output, whatever its exit status
/// (see [`run_tool`] for one that must succeed). Killed when the limit passes.
pub fn run_tool_any(command: &mut Command, limit: Duration) -> Result<ToolRun, ToolError> {
    let command_line = describe_command(command);
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ToolError::Spawn {
            command: command_line.clone(),
            source,
        })?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() >= limit => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(source) => {
                let _ = child.kill();
                return Err(ToolError::Spawn {
                    command: command_line,
                    source,
                });
            }
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(ToolRun {
            command_line,
            status,
            stdout,
            stderr,
            elapsed: started.elapsed(),
        }),
        None => Err(ToolError::TimedOut {
            command: command_line,
            limit,
            stdout,
            stderr,
        }),
    }
}

/// Runs `command` within `limit`; it must exit successfully.
pub fn run_tool(command: &mut Command, limit: Duration) -> Result<ToolRun, ToolError> {
    let run = run_tool_any(command, limit)?;
    if run.status.success() {
        return Ok(run);
    }
    Err(ToolError::Failed {
        command: run.command_line,
        status: run.status,
        stdout: run.stdout,
        stderr: run.stderr,
    })
}

/// `NBDMAGIC` ("Newstyle negotiation").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, the option magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The option reply magic.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The request magic ("Request message").
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The simple reply magic ("Simple reply message").
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_FLAG_FIXED_NEWSTYLE` in the server's handshake flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// `NBD_FLAG_NO_ZEROES` in the server's handshake flags.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// `NBD_FLAG_C_FIXED_NEWSTYLE` in the client's flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// `NBD_FLAG_C_NO_ZEROES` in the client's flags.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// `NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES`.
pub const CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
/// `NBD_FLAG_HAS_FLAGS` in the transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY` in the transmission flags.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH` in the transmission flags.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// The bit every error reply type (`NBD_REP_ERR_*`) has set.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR + 1;
/// `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;
/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_FLAG_FUA`.
pub const FLAG_FUA: u16 = 1;
/// `NBD_EPERM`.
pub const NBD_EPERM: u32 = 1;
/// `NBD_EIO`.
pub const NBD_EIO: u32 = 5;
/// `NBD_EINVAL`.
pub const NBD_EINVAL: u32 = 22;
/// `NBD_ENOSPC`.
pub const NBD_ENOSPC: u32 = 28;

/// Appends an option message (`IHAVEOPT`, the option, the data's length, the data) to `out`.
pub fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The data of `NBD_OPT_GO` for `export`, asking for the `NBD_INFO_*` items in `info`.
pub fn go_option_data(export: &str, info: &[u16]) -> Vec<u8> {
    let mut data = Vec::with_capacity(6 + export.len() + 2 * info.len());
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&(info.len() as u16).to_be_bytes());
    for item in info {
        data.extend_from_slice(&item.to_be_bytes());
    }
    data
}

/// Appends a request message (the header, then `payload` as given: it need not match
/// `length`, so that a test can lie) to `out`.
pub fn encode_request(
    out: &mut Vec<u8>,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: &[u8],
) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The error value and cookie of a simple reply's 16-byte header, or the magic it carried
/// instead of the simple reply's.
pub fn decode_simple_reply(header: &[u8; 16]) -> Result<(u32, u64), u32> {
    let field = |range: core::ops::Range<usize>| {
        header[range]
            .iter()
            .fold(0u64, |value, &byte| value << 8 | u64::from(byte))
    };
    let magic = field(0..4) as u32;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(magic);
    }
    Ok((field(4..8) as u32, field(8..16)))
}

/// One option reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionReply {
    /// The option it answers.
    pub option: u32,
    /// The reply type (`NBD_REP_*`).
    pub kind: u32,
    /// Its data.
    pub data: Vec<u8>,
}

/// A simple reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    /// `0` or an `NBD_E*` value.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
    /// The data (a successful read's).
    pub data: Vec<u8>,
}

fn protocol_error(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// A raw NBD client over one TCP connection (see the module header).
pub struct NbdClient {
    stream: TcpStream,
    /// The export's size (from `NBD_INFO_EXPORT`), once in transmission.
    pub size: u64,
    /// The transmission flags (from `NBD_INFO_EXPORT`), once in transmission.
    pub flags: u16,
    next_cookie: u64,
}

impl NbdClient {
    /// Connects and reads the server's greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags).
    /// Every read and write waits at most `timeout`.
    pub fn connect(address: SocketAddr, timeout: Duration) -> io::Result<NbdClient> {
        let stream = TcpStream::connect_timeout(&address, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let mut client = NbdClient {
            stream,
            size: 0,
            flags: 0,
            next_cookie: 1,
        };
        let mut greeting = [0u8; 18];
        client.stream.read_exact(&mut greeting)?;
        let magic = u64::from_be_bytes(greeting[..8].try_into().unwrap_or_default());
        let option = u64::from_be_bytes(greeting[8..16].try_into().unwrap_or_default());
        if magic != NBDMAGIC || option != IHAVEOPT {
            return Err(protocol_error(format!(
                "bad greeting {:02x?}",
                &greeting[..16]
            )));
        }
        Ok(client)
    }

    /// Connects, sends the client flags and `NBD_OPT_GO` for [`EXPORT_NAME`]: in transmission
    /// with the export's size and flags, or the error the server gave.
    pub fn go(address: SocketAddr, timeout: Duration) -> io::Result<NbdClient> {
        let mut client = NbdClient::connect(address, timeout)?;
        client.send(&CLIENT_FLAGS.to_be_bytes())?;
        client.send_option(OPT_GO, &go_option_data(EXPORT_NAME, &[]))?;
        loop {
            let reply = client.read_option_reply()?;
            match reply.kind {
                REP_INFO if reply.data.len() == 12 && reply.data[..2] == [0, 0] => {
                    client.size =
                        u64::from_be_bytes(reply.data[2..10].try_into().unwrap_or_default());
                    client.flags = u16::from_be_bytes([reply.data[10], reply.data[11]]);
                }
                REP_INFO => {}
                REP_ACK => return Ok(client),
                kind => {
                    return Err(protocol_error(format!(
                        "NBD_OPT_GO answered with reply type {kind:#x}"
                    )));
                }
            }
        }
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends an option (`IHAVEOPT`, the option, the length, the data).
    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(16 + data.len());
        encode_option(&mut bytes, option, data);
        self.send(&bytes)
    }

    /// Reads one option reply.
    pub fn read_option_reply(&mut self) -> io::Result<OptionReply> {
        let mut header = [0u8; 20];
        self.stream.read_exact(&mut header)?;
        let magic = u64::from_be_bytes(header[..8].try_into().unwrap_or_default());
        if magic != OPTION_REPLY_MAGIC {
            return Err(protocol_error(format!("bad option reply magic {magic:#x}")));
        }
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap_or_default());
        let kind = u32::from_be_bytes(header[12..16].try_into().unwrap_or_default());
        let length = u32::from_be_bytes(header[16..20].try_into().unwrap_or_default());
        if length > 1 << 20 {
            return Err(protocol_error(format!("option reply of {length} bytes")));
        }
        let mut data = vec![0; length as usize];
        self.stream.read_exact(&mut data)?;
        Ok(OptionReply { option, kind, data })
    }

    /// A fresh cookie.
    pub fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    /// Sends a request header (and `payload` after it, as given: it need not match
    /// `length`).
    pub fn send_request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(28 + payload.len());
        encode_request(&mut bytes, flags, kind, cookie, offset, length, payload);
        self.send(&bytes)
    }

    /// Reads a simple reply; a successful one carries `data_length` bytes of data.
    pub fn read_reply(&mut self, data_length: usize) -> io::Result<SimpleReply> {
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header)?;
        let (error, cookie) = decode_simple_reply(&header)
            .map_err(|magic| protocol_error(format!("bad reply magic {magic:#x}")))?;
        let mut data = Vec::new();
        if error == 0 && data_length > 0 {
            data = vec![0; data_length];
            self.stream.read_exact(&mut data)?;
        }
        Ok(SimpleReply {
            error,
            cookie,
            data,
        })
    }

    /// One request and its reply, checking the cookie.
    pub fn exchange(
        &mut self,
        flags: u16,
        kind: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<SimpleReply> {
        let cookie = self.cookie();
        self.send_request(flags, kind, cookie, offset, length, payload)?;
        let data_length = if kind == CMD_READ { length as usize } else { 0 };
        let reply = self.read_reply(data_length)?;
        if reply.cookie != cookie {
            return Err(protocol_error(format!(
                "reply cookie {:#x} for request {cookie:#x}",
                reply.cookie
            )));
        }
        Ok(reply)
    }

    /// Reads `length` bytes at `offset`: the data, or the server's error.
    pub fn read(&mut self, offset: u64, length: u32) -> io::Result<Result<Vec<u8>, u32>> {
        let reply = self.exchange(0, CMD_READ, offset, length, &[])?;
        Ok(if reply.error == 0 {
            Ok(reply.data)
        } else {
            Err(reply.error)
        })
    }

    /// Writes `data` at `offset` (with FUA when `fua`): `Ok(())` or the server's error.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<Result<(), u32>> {
        let flags = if fua { FLAG_FUA } else { 0 };
        let reply = self.exchange(flags, CMD_WRITE, offset, data.len() as u32, data)?;
        Ok(if reply.error == 0 {
            Ok(())
        } else {
            Err(reply.error)
        })
    }

    /// Flushes: `Ok(())` or the server's error.
    pub fn flush(&mut self) -> io::Result<Result<(), u32>> {
        let reply = self.exchange(0, CMD_FLUSH, 0, 0, &[])?;
        Ok(if reply.error == 0 {
            Ok(())
        } else {
            Err(reply.error)
        })
    }

    /// Sends `NBD_CMD_DISC` (no reply comes).
    pub fn disconnect(mut self) -> io::Result<()> {
        let cookie = self.cookie();
        self.send_request(0, CMD_DISC, cookie, 0, 0, &[])
    }

    /// Whether the server closed the connection: a read gets end of file (or a reset) within
    /// `wait`; `false` when the connection stays open that long or bytes arrive.
    pub fn closed_by_server(&mut self, wait: Duration) -> bool {
        if self.stream.set_read_timeout(Some(wait)).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(error) => !matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_tool_captures_output_reports_failures_and_kills_at_the_limit() {
        let mut ok = Command::new("sh");
        ok.args(["-c", "echo out; echo err >&2"]);
        let run = run_tool(&mut ok, Duration::from_secs(10)).expect("sh runs");
        assert_eq!(
            (run.stdout.as_str(), run.stderr.as_str()),
            ("out\n", "err\n")
        );
        assert_eq!(run.command_line, "sh -c 'echo out; echo err >&2'");

        let mut failing = Command::new("sh");
        failing.args(["-c", "echo why >&2; exit 3"]);
        match run_tool(&mut failing, Duration::from_secs(10)) {
            Err(ToolError::Failed { status, stderr, .. }) => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(stderr, "why\n");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        let mut any = Command::new("sh");
        any.args(["-c", "exit 3"]);
        let run = run_tool_any(&mut any, Duration::from_secs(10)).expect("runs");
        assert_eq!(run.status.code(), Some(3));

        let began = Instant::now();
        let mut slow = Command::new("sleep");
        slow.arg("30");
        match run_tool(&mut slow, Duration::from_millis(200)) {
            Err(ToolError::TimedOut { limit, .. }) => {
                assert_eq!(limit, Duration::from_millis(200));
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "killed at the limit"
        );

        let mut missing = Command::new("/nonexistent/vireo-tool");
        assert!(matches!(
            run_tool(&mut missing, Duration::from_secs(1)),
            Err(ToolError::Spawn { .. })
        ));
    }

    #[test]
    fn messages_are_laid_out_as_the_protocol_document_says() {
        let mut request = Vec::new();
        encode_request(&mut request, FLAG_FUA, CMD_WRITE, 7, 4096, 3, b"abc");
        assert_eq!(request.len(), 28 + 3);
        assert_eq!(request[..4], REQUEST_MAGIC.to_be_bytes());
        assert_eq!(request[4..6], FLAG_FUA.to_be_bytes());
        assert_eq!(request[6..8], CMD_WRITE.to_be_bytes());
        assert_eq!(request[8..16], 7u64.to_be_bytes());
        assert_eq!(request[16..24], 4096u64.to_be_bytes());
        assert_eq!(request[24..28], 3u32.to_be_bytes());
        assert_eq!(&request[28..], b"abc");

        let data = go_option_data("ab", &[INFO_BLOCK_SIZE]);
        assert_eq!(data, [0, 0, 0, 2, b'a', b'b', 0, 1, 0, 3]);
        let mut option = Vec::new();
        encode_option(&mut option, OPT_GO, &data);
        assert_eq!(option[..8], IHAVEOPT.to_be_bytes());
        assert_eq!(option[8..12], OPT_GO.to_be_bytes());
        assert_eq!(option[12..16], (data.len() as u32).to_be_bytes());

        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        header[4..8].copy_from_slice(&NBD_EIO.to_be_bytes());
        header[8..].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        assert_eq!(
            decode_simple_reply(&header),
            Ok((NBD_EIO, 0x0102_0304_0506_0708))
        );
        header[0] ^= 1;
        assert_eq!(
            decode_simple_reply(&header),
            Err(SIMPLE_REPLY_MAGIC ^ (1 << 24))
        );
    }

    #[test]
    fn the_uri_names_the_address_and_the_export() {
        let address = SocketAddr::from(([10, 0, 2, 15], NBD_PORT));
        assert_eq!(nbd_uri(address), "nbd://10.0.2.15:10809/vireo");
        assert!(NBD_TOOLS.contains(&("nbdcopy", "libnbd-bin")));
        assert!(NBD_TOOLS.contains(&("qemu-io", "qemu-utils")));
    }
}
