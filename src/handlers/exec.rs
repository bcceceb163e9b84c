//! Script handlers: argv without a shell, the envelope on stdin, a clean environment,
//! a process group of its own so that a timeout, or a call given up (the billing hung
//! up), kills everything the script started.

use std::process::Stdio;

use bytes::{Bytes, BytesMut};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{Call, CallError, REPLY_CAP, Reply, STDERR_CAP};
use crate::config::ScriptTarget;

/// Variables passed through from provisiond's own environment; everything else is
/// cleared so that no secret of the sidecar leaks into a script by accident.
const PASSED_THROUGH: &[&str] = &["PATH", "HOME", "LANG"];

pub(crate) async fn call(target: &ScriptTarget, call: &Call<'_>) -> Result<Reply, CallError> {
    let mut command = Command::new(&target.program);
    command
        .arg0(&target.argv[0])
        .args(&target.argv[1..])
        .env_clear()
        .current_dir(&target.workdir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for name in PASSED_THROUGH {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command
        .envs(target.env.iter().map(|(k, v)| (k, v)))
        .env("PROVISIONING_EVENT", call.event)
        .env("PROVISIONING_OBJECT_ID", call.object_id)
        .env("PROVISIONING_HANDLER", &call.handler.name)
        .env("PROVISIONING_ATTEMPT", call.attempt.to_string());

    let mut child = command.spawn().map_err(|e| CallError::Spawn {
        program: target.shown_argv[0].clone(),
        error: e.to_string(),
    })?;
    let pid = child.id();
    // Until the script has exited, a call that ends any other way (a timeout, or its
    // future dropped because the billing hung up) kills the whole group. `kill_on_drop`
    // alone would reach the script only, not what it started.
    let mut group = GroupGuard::new(pid);
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let body = call.body.clone();

    let run = async {
        let write = async move {
            // A script that exits without reading its stdin is fine: ignore the broken pipe.
            let _ = stdin.write_all(&body).await;
            drop(stdin);
        };
        let (_, (stdout, truncated), stderr) = tokio::join!(
            write,
            read_head(stdout, REPLY_CAP),
            read_tail(stderr, STDERR_CAP)
        );
        let status = child.wait().await;
        (status, stdout, truncated, stderr)
    };
    let (status, stdout, truncated, stderr) = match tokio::time::timeout(call.timeout, run).await {
        Ok(done) => done,
        Err(_) => {
            group.kill();
            let _ = child.wait().await;
            group.disarm();
            return Err(CallError::Timeout(call.timeout));
        }
    };
    // The script has exited and been reaped: its group is no longer ours to kill (a
    // background child it left is its own business, as documented).
    group.disarm();
    let status = status.map_err(|e| CallError::Io(format!("waiting for the script: {e}")))?;
    use std::os::unix::process::ExitStatusExt as _;
    Ok(Reply::Script {
        code: status.code(),
        signal: status.signal(),
        stdout,
        truncated,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// The process groups of the scripts running now: what [`kill_running`] kills.
static RUNNING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Kills every script running now, with everything it started: for a process that
/// exits without unwinding (`std::process::exit` on a second SIGTERM), whose calls'
/// guards never run, so that no script outlives it.
pub(crate) fn kill_running() {
    let running = RUNNING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for pid in running.iter().filter_map(|p| i32::try_from(*p).ok()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// The process group of a running script (the script is its leader): killed with
/// everything in it when the guard is dropped while still armed.
struct GroupGuard(Option<u32>);

impl GroupGuard {
    fn new(pid: Option<u32>) -> Self {
        if let Some(pid) = pid {
            let mut running = RUNNING
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            running.push(pid);
        }
        Self(pid)
    }

    /// Kills the script's whole process group: the script and anything it started.
    fn kill(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    /// The script has been waited for: nothing to kill any more.
    fn disarm(&mut self) {
        if let Some(pid) = self.0.take() {
            let mut running = RUNNING
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(at) = running.iter().position(|p| *p == pid) {
                running.swap_remove(at);
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
        self.disarm();
    }
}

/// How much more room a read into a reply's buffer makes at a time: a script's reply
/// is read into the buffer kept, with no scratch buffer to zero for every call.
const READ_ROOM: usize = 8 << 10;

/// Reads to the end, keeping the first `cap` bytes.
async fn read_head(mut reader: impl AsyncRead + Unpin, cap: usize) -> (Bytes, bool) {
    let mut kept = BytesMut::new();
    let mut truncated = false;
    loop {
        kept.reserve(READ_ROOM);
        match reader.read_buf(&mut kept).await {
            Ok(0) | Err(_) => break,
            Ok(_) if kept.len() > cap => {
                truncated = true;
                kept.truncate(cap);
            }
            Ok(_) => {}
        }
    }
    (kept.freeze(), truncated)
}

/// Reads to the end, keeping the last `cap` bytes.
async fn read_tail(mut reader: impl AsyncRead + Unpin, cap: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    loop {
        kept.reserve(READ_ROOM);
        match reader.read_buf(&mut kept).await {
            Ok(0) | Err(_) => break,
            Ok(_) if kept.len() > 2 * cap => {
                kept.drain(..kept.len() - cap);
            }
            Ok(_) => {}
        }
    }
    if kept.len() > cap {
        kept.drain(..kept.len() - cap);
    }
    kept
}

/// The last lines of a script's stderr, at most `max_bytes` of them: the message of a
/// script that forbids, as a git hook's would be.
pub(crate) fn last_lines(stderr: &str, lines: usize, max_bytes: usize) -> String {
    let trimmed = stderr.trim_end();
    let mut start = trimmed.len();
    for _ in 0..lines {
        match trimmed[..start].rfind('\n') {
            Some(at) => start = at,
            None => {
                start = 0;
                break;
            }
        }
    }
    let mut text = trimmed[start..].trim_start_matches('\n');
    if text.len() > max_bytes {
        let mut cut = text.len() - max_bytes;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = &text[cut..];
    }
    text.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines() {
        assert_eq!(last_lines("a\nb\nc\nd\n", 2, 100), "c\nd");
        assert_eq!(last_lines("only", 5, 100), "only");
        assert_eq!(last_lines("", 5, 100), "");
        assert_eq!(last_lines("xxxxé", 1, 2), "é");
    }

    #[tokio::test]
    async fn a_reply_keeps_its_head_and_stderr_its_tail_whatever_their_length() {
        let text: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
        for len in [0, 1, 1000, 8 << 10, 50_000, 400_000] {
            let source = &text[..len];
            let (head, truncated) = read_head(source, 10_000).await;
            assert_eq!(&head[..], &source[..len.min(10_000)], "{len}");
            assert_eq!(truncated, len > 10_000, "{len}");
            let tail = read_tail(source, 10_000).await;
            assert_eq!(&tail[..], &source[len.saturating_sub(10_000)..], "{len}");
        }
    }
}
