//! Runs one declared node command: fixed argv, no shell, a timeout, capped output.
//!
//! A node declares its commands in `[node.commands]`; an invocation names one and may pass
//! extra arguments only when the command says `args = true`. The program is started
//! directly (never through a shell), its output is read up to a cap (the rest is drained
//! and dropped, so a chatty program cannot block on a full pipe), and it is killed when it
//! outlives its timeout.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::time::Instant;

/// Default cap on each of stdout and stderr.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// A declared command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// Program and fixed arguments.
    pub argv: Vec<String>,
    /// Whether an invocation may append arguments.
    pub args: bool,
    /// Killed after this long.
    pub timeout: Duration,
    /// Bytes kept of each of stdout and stderr.
    pub max_output_bytes: usize,
}

/// What a finished command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// The exit code; `None` when killed by a signal.
    pub exit_code: Option<i32>,
    /// Stdout, lossily decoded, cut at the cap.
    pub stdout: String,
    /// Stderr, lossily decoded, cut at the cap.
    pub stderr: String,
    /// Whether either stream was cut.
    pub truncated: bool,
    /// Wall time.
    pub duration_ms: u64,
}

/// Why a command did not produce output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Extra arguments for a command that takes none.
    #[error("this command takes no extra arguments")]
    ArgsNotAllowed,
    /// The declared argv is empty.
    #[error("the command has no program")]
    Empty,
    /// The program could not be started.
    #[error("cannot start {program}: {cause}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        cause: String,
    },
    /// It outlived its timeout and was killed.
    #[error("timed out after {0} ms and was killed")]
    Timeout(u64),
}

/// Runs `spec` with `extra` arguments appended (only if it allows them).
pub async fn run(spec: &CommandSpec, extra: &[String]) -> Result<CommandOutput, CommandError> {
    if !extra.is_empty() && !spec.args {
        return Err(CommandError::ArgsNotAllowed);
    }
    let (program, fixed) = spec.argv.split_first().ok_or(CommandError::Empty)?;
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(fixed)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| CommandError::Spawn {
            program: program.clone(),
            cause: e.to_string(),
        })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let cap = spec.max_output_bytes;
    let work = async {
        let (out, err, status) = tokio::join!(
            read_capped(stdout, cap),
            read_capped(stderr, cap),
            child.wait()
        );
        (out, err, status)
    };
    match tokio::time::timeout(spec.timeout, work).await {
        Ok(((stdout, cut_out), (stderr, cut_err), status)) => Ok(CommandOutput {
            exit_code: status.ok().and_then(|s| s.code()),
            stdout,
            stderr,
            truncated: cut_out || cut_err,
            duration_ms: started.elapsed().as_millis() as u64,
        }),
        // Dropping `work` drops the child, and `kill_on_drop` kills it.
        Err(_) => Err(CommandError::Timeout(spec.timeout.as_millis() as u64)),
    }
}

/// Reads a stream to its end, keeping at most `cap` bytes; returns (text, was cut).
async fn read_capped(stream: Option<impl AsyncRead + Unpin>, cap: usize) -> (String, bool) {
    let Some(mut stream) = stream else {
        return (String::new(), false);
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    let mut cut = false;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                cut |= n > room;
            }
        }
    }
    (String::from_utf8_lossy(&kept).into_owned(), cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(argv: &[&str], args: bool, timeout_ms: u64, cap: usize) -> CommandSpec {
        CommandSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            args,
            timeout: Duration::from_millis(timeout_ms),
            max_output_bytes: cap,
        }
    }

    #[tokio::test]
    async fn runs_without_a_shell_and_reports_output_and_code() {
        let out = run(
            &spec(&["echo", "hello", "$HOME", ";", "true"], false, 5000, 1024),
            &[],
        )
        .await
        .expect("runs");
        assert_eq!(out.stdout, "hello $HOME ; true\n", "no shell expansion");
        assert_eq!(out.exit_code, Some(0));
        let out = run(
            &spec(&["sh", "-c", "echo oops >&2; exit 3"], false, 5000, 1024),
            &[],
        )
        .await
        .expect("runs");
        assert_eq!((out.exit_code, out.stderr.as_str()), (Some(3), "oops\n"));
    }

    #[tokio::test]
    async fn extra_args_only_when_allowed() {
        let fixed = spec(&["echo", "a"], false, 5000, 1024);
        assert_eq!(
            run(&fixed, &["b".to_string()]).await,
            Err(CommandError::ArgsNotAllowed)
        );
        let open = spec(&["echo", "a"], true, 5000, 1024);
        let out = run(&open, &["b; rm -rf /".to_string()])
            .await
            .expect("runs");
        assert_eq!(
            out.stdout, "a b; rm -rf /\n",
            "arguments are passed verbatim, not to a shell"
        );
    }

    #[tokio::test]
    async fn timeout_kills_and_output_is_capped() {
        let started = std::time::Instant::now();
        let err = run(&spec(&["sleep", "30"], false, 200, 1024), &[])
            .await
            .expect_err("times out");
        assert_eq!(err, CommandError::Timeout(200));
        assert!(started.elapsed() < Duration::from_secs(5));
        let out = run(&spec(&["seq", "1", "100000"], false, 5000, 100), &[])
            .await
            .expect("runs");
        assert_eq!(out.stdout.len(), 100);
        assert!(out.truncated);
        assert_eq!(
            out.exit_code,
            Some(0),
            "the rest was drained, the program finished"
        );
        let err = run(&spec(&["/nonexistent/prog"], false, 5000, 100), &[])
            .await
            .expect_err("no program");
        assert!(matches!(err, CommandError::Spawn { .. }), "{err}");
    }
}
