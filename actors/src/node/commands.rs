//! Runs one declared node command: fixed argv, no shell, a clean environment, its own
//! process group, a timeout, capped output.
//!
//! A node declares its commands in `[node.commands]`; an invocation names one and may pass
//! extra arguments only when the command says `args = true`. The program is started
//! directly (never through a shell), its output is read up to a cap (the rest is drained
//! and dropped, so a chatty program cannot block on a full pipe), and it is killed when it
//! outlives its timeout.
//!
//! ## Isolation
//!
//! * **Environment.** The program gets exactly [`CommandSpec::env`] and nothing of the node
//!   host's own environment (its gateway token, `WARDEN_*` settings, cloud credentials).
//!   The node host builds that map with [`environment`]: `PATH`, `LANG` and `HOME` copied
//!   from its own environment when set there, then the command's `env` table, which wins.
//! * **Process group.** Each run leads a process group of its own. When the run ends —
//!   its program exited, it timed out, or the future running it was dropped because the
//!   connection was lost or the node is stopping — the whole group is killed with
//!   SIGKILL and the program itself is reaped (on a drop, by tokio's orphan reaper).
//!   Nothing a run starts outlives it, unless it leaves the group on purpose (`setsid`).
//! * **Arguments.** A caller's argument that starts with `-` could turn into an option of
//!   the program (`--output=/etc/passwd`), so it is refused unless the command says
//!   `allow_option_args = true` or `args_after_separator = true`; the latter puts the
//!   caller's arguments after a literal `--`, where programs that follow the convention
//!   read them as operands.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Default cap on each of stdout and stderr.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// The variables a command inherits from the node host's environment, when set there.
pub const INHERITED_ENV: [&str; 3] = ["PATH", "LANG", "HOME"];

/// The separator put before the caller's arguments with `args_after_separator`.
pub const SEPARATOR: &str = "--";

/// A declared command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// Program and fixed arguments.
    pub argv: Vec<String>,
    /// Whether an invocation may append arguments.
    pub args: bool,
    /// Whether each run needs an approval grant (checked by the connection, announced to
    /// the gateway).
    pub approval: bool,
    /// Killed after this long, counted from the start of the program.
    pub timeout: Duration,
    /// Bytes kept of each of stdout and stderr.
    pub max_output_bytes: usize,
    /// The program's whole environment (see [`environment`]).
    pub env: BTreeMap<String, String>,
    /// Put the caller's arguments after a literal `--`.
    pub args_after_separator: bool,
    /// Accept caller arguments that start with `-` even before any separator.
    pub allow_option_args: bool,
}

impl CommandSpec {
    /// A command running `argv` with the defaults of `[node.commands.<name>]`: no extra
    /// arguments, no approval, 60 s, 64 KiB of output, an empty environment.
    pub fn new(argv: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            args: false,
            approval: false,
            timeout: Duration::from_secs(60),
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            env: BTreeMap::new(),
            args_after_separator: false,
            allow_option_args: false,
        }
    }
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
    /// A caller's argument that could be read as an option.
    #[error(
        "argument {0:?} starts with '-', and this command takes no options from callers \
         (allow_option_args = false)"
    )]
    OptionArg(String),
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

impl CommandError {
    /// Whether the caller asked for something the command does not allow (as opposed to a
    /// run that failed).
    pub fn is_bad_request(&self) -> bool {
        matches!(self, Self::ArgsNotAllowed | Self::OptionArg(_))
    }
}

/// The environment of a command: each of [`INHERITED_ENV`] that `lookup` finds in the
/// node host's environment, then the command's `own` table, which wins.
pub fn environment(
    lookup: impl Fn(&str) -> Option<String>,
    own: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = INHERITED_ENV
        .iter()
        .filter_map(|key| Some((key.to_string(), lookup(key)?)))
        .collect();
    env.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// Why `key = value` cannot be an environment variable: an empty key, or `=` or NUL in the
/// key, or NUL in the value.
pub fn check_env(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("a variable name is empty".to_string());
    }
    if key.contains(['=', '\0']) {
        return Err(format!("variable name {key:?} contains '=' or NUL"));
    }
    if value.contains('\0') {
        return Err(format!("the value of {key} contains NUL"));
    }
    Ok(())
}

/// Checks the caller's `extra` arguments against what `spec` allows.
pub fn check_args(spec: &CommandSpec, extra: &[String]) -> Result<(), CommandError> {
    if !extra.is_empty() && !spec.args {
        return Err(CommandError::ArgsNotAllowed);
    }
    if spec.allow_option_args || spec.args_after_separator {
        return Ok(());
    }
    match extra.iter().find(|arg| arg.starts_with('-')) {
        Some(arg) => Err(CommandError::OptionArg(arg.clone())),
        None => Ok(()),
    }
}

/// The full argv of a run: the declared argv, then [`SEPARATOR`] if the command asks for
/// it and the caller gave arguments, then those arguments.
fn argv<'a>(spec: &'a CommandSpec, extra: &'a [String]) -> impl Iterator<Item = &'a str> {
    let separator = (spec.args_after_separator && !extra.is_empty()).then_some(SEPARATOR);
    let declared = spec.argv.iter().map(String::as_str);
    declared
        .chain(separator)
        .chain(extra.iter().map(String::as_str))
}

/// Runs `spec` with the caller's `extra` arguments (only if it allows them).
///
/// Dropping the returned future kills the run's whole process group.
pub async fn run(spec: &CommandSpec, extra: &[String]) -> Result<CommandOutput, CommandError> {
    check_args(spec, extra)?;
    let mut argv = argv(spec, extra);
    let program = argv
        .next()
        .filter(|p| !p.is_empty())
        .ok_or(CommandError::Empty)?;
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(argv)
        .env_clear()
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| CommandError::Spawn {
            program: program.to_string(),
            cause: e.to_string(),
        })?;
    // Declared after `child`, so a drop kills the group before the child is handed to
    // tokio's reaper.
    let mut group = Group::of(&child);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let cap = spec.max_output_bytes;
    let work = async {
        let exited = async {
            let status = child.wait().await;
            // What the program left behind dies with it, and so lets go of the pipes.
            group.kill();
            status
        };
        tokio::join!(read_capped(stdout, cap), read_capped(stderr, cap), exited)
    };
    match tokio::time::timeout(spec.timeout, work).await {
        Ok(((stdout, cut_out), (stderr, cut_err), status)) => Ok(CommandOutput {
            exit_code: status.ok().and_then(|s| s.code()),
            stdout,
            stderr,
            truncated: cut_out || cut_err,
            duration_ms: started.elapsed().as_millis() as u64,
        }),
        Err(_) => {
            group.kill();
            reap(&mut child).await;
            Err(CommandError::Timeout(spec.timeout.as_millis() as u64))
        }
    }
}

/// Kills the program itself too (should it have left its group) and waits for it.
async fn reap(child: &mut Child) {
    // An error means it is already gone: nothing to kill or wait for.
    let _ = child.start_kill();
    // SIGKILL cannot be caught; only a process stuck in the kernel takes a moment.
    let _ = child.wait().await;
}

/// The process group a run leads; killed with SIGKILL when dropped.
struct Group(Option<Pid>);

impl Group {
    /// The group `child` leads (it was spawned with `process_group(0)`).
    fn of(child: &Child) -> Self {
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(Pid::from_raw);
        Self(pid)
    }

    /// Sends SIGKILL to every process of the group, once.
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH: the group is already empty.
            let _ = kill_process_group(pgid, Signal::KILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
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
    use std::path::{Path, PathBuf};

    use super::*;

    fn spec(argv: &[&str], args: bool, timeout_ms: u64, cap: usize) -> CommandSpec {
        CommandSpec {
            args,
            timeout: Duration::from_millis(timeout_ms),
            max_output_bytes: cap,
            env: environment(|key| std::env::var(key).ok(), &BTreeMap::new()),
            ..CommandSpec::new(argv.iter().copied())
        }
    }

    /// `sh -c script sh`, taking caller arguments: the script sees them as `"$@"`.
    fn script(text: &str) -> CommandSpec {
        spec(&["sh", "-c", text, "sh"], true, 5000, 1024)
    }

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    /// A file path unique to this test process and `name`.
    fn scratch(name: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("warden-commands-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    /// The processes of group `pgid` that are alive (zombies are dead: they wait only for
    /// their parent to reap them).
    fn live_in_group(pgid: i32) -> Vec<i32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|entry| {
            let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses.
            let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
            let state = rest.next()?;
            let pgrp: i32 = rest.nth(1)?.parse().ok()?;
            (pgrp == pgid && state != "Z" && state != "X").then_some(pid)
        })
        .collect()
    }

    /// Waits until `check` holds, or fails naming `what` after five seconds.
    async fn until(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "not within 5 s: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The group id a script wrote with `echo $$ > file` (the shell leads its group).
    fn pgid_in(file: &Path) -> Option<i32> {
        let text = std::fs::read_to_string(file).ok()?;
        text.strip_suffix('\n')?.parse().ok()
    }

    /// A shell that writes its pid to `file` and waits on two `sleep 300`, one in the
    /// background.
    fn two_sleeps(file: &Path, timeout_ms: u64) -> CommandSpec {
        let text = format!(
            "sleep 300 & echo $$ > {}.tmp && mv {0}.tmp {0}; sleep 300",
            file.display()
        );
        spec(&["sh", "-c", &text], false, timeout_ms, 1024)
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
            run(&fixed, &strings(&["b"])).await,
            Err(CommandError::ArgsNotAllowed)
        );
        let open = spec(&["echo", "a"], true, 5000, 1024);
        let out = run(&open, &strings(&["b; rm -rf /"])).await.expect("runs");
        assert_eq!(
            out.stdout, "a b; rm -rf /\n",
            "arguments are passed verbatim, not to a shell"
        );
    }

    #[tokio::test]
    async fn the_environment_holds_only_path_lang_home_and_its_own() {
        // The test process has plenty more (CARGO_*, RUST_*, whatever the shell exported).
        assert!(
            std::env::vars().any(|(k, _)| !INHERITED_ENV.contains(&k.as_str())),
            "the test needs a variable the command must not see"
        );
        let own = BTreeMap::from([
            ("GREETING".to_string(), "hello world".to_string()),
            ("HOME".to_string(), "/nowhere".to_string()),
        ]);
        let mut env_cmd = spec(&["env"], false, 5000, 64 * 1024);
        env_cmd.env = environment(|key| std::env::var(key).ok(), &own);
        let out = run(&env_cmd, &[]).await.expect("runs");
        let seen: BTreeMap<&str, &str> = out
            .stdout
            .lines()
            .filter_map(|line| line.split_once('='))
            .collect();
        let keys: Vec<&str> = seen.keys().copied().collect();
        let mut expected = vec!["GREETING", "HOME"];
        for key in ["LANG", "PATH"] {
            if std::env::var_os(key).is_some() {
                expected.push(key);
            }
        }
        expected.sort_unstable();
        assert_eq!(keys, expected, "{}", out.stdout);
        assert_eq!(seen["GREETING"], "hello world");
        assert_eq!(seen["HOME"], "/nowhere", "the command's own env wins");
    }

    #[test]
    fn env_names_must_be_names() {
        assert_eq!(check_env("A_B", "x=y"), Ok(()));
        for (key, value) in [("", "v"), ("A=B", "v"), ("A\0", "v"), ("A", "v\0")] {
            assert!(check_env(key, value).is_err(), "{key:?} = {value:?}");
        }
    }

    #[tokio::test]
    async fn option_args_are_refused_unless_allowed() {
        let plain = script("printf '%s|' \"$@\"");
        assert_eq!(
            run(&plain, &strings(&["ok", "-x"])).await,
            Err(CommandError::OptionArg("-x".to_string()))
        );
        assert_eq!(
            run(&plain, &strings(&["--output=/etc/passwd"])).await,
            Err(CommandError::OptionArg("--output=/etc/passwd".to_string()))
        );
        let err = CommandError::OptionArg("-x".to_string());
        assert!(err.is_bad_request() && err.to_string().contains("\"-x\""));
        let out = run(&plain, &strings(&["a-b", "c"])).await.expect("runs");
        assert_eq!(out.stdout, "a-b|c|", "a dash inside an argument is fine");

        let allowed = CommandSpec {
            allow_option_args: true,
            ..plain.clone()
        };
        let out = run(&allowed, &strings(&["-x"])).await.expect("runs");
        assert_eq!(out.stdout, "-x|");
    }

    #[tokio::test]
    async fn args_after_separator_follow_a_literal_double_dash() {
        let separated = CommandSpec {
            args_after_separator: true,
            ..script("printf '%s|' \"$@\"")
        };
        let out = run(&separated, &strings(&["-x", "y"]))
            .await
            .expect("an option-like argument is an operand after --");
        assert_eq!(out.stdout, "--|-x|y|");
        let out = run(&separated, &[]).await.expect("runs");
        assert_eq!(out.stdout, "|", "no separator without caller arguments");
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

    #[tokio::test]
    async fn a_timed_out_run_leaves_no_live_process_of_its_group() {
        let file = scratch("timeout");
        let sleeps = two_sleeps(&file, 2000);
        let watch = async {
            // The shell and both sleeps are up well before the timeout.
            until("the shell and the background sleep run", || {
                pgid_in(&file).is_some_and(|g| live_in_group(g).len() >= 2)
            })
            .await;
        };
        let bounded = tokio::time::timeout(Duration::from_secs(10), run(&sleeps, &[]));
        let (result, ()) = tokio::join!(bounded, watch);
        let result = result.expect("the run ends soon after its timeout");
        assert_eq!(result, Err(CommandError::Timeout(2000)));
        let pgid = pgid_in(&file).expect("pgid");
        until("the group is gone", || live_in_group(pgid).is_empty()).await;
        let _ = std::fs::remove_file(&file);
    }

    #[tokio::test]
    async fn a_dropped_run_kills_its_group() {
        let file = scratch("dropped");
        let sleeps = two_sleeps(&file, 300_000);
        let mut running = Box::pin(run(&sleeps, &[]));
        tokio::select! {
            result = &mut running => panic!("ended early: {result:?}"),
            () = until("the shell and the background sleep run", || {
                pgid_in(&file).is_some_and(|g| live_in_group(g).len() >= 2)
            }) => {}
        }
        let pgid = pgid_in(&file).expect("pgid");
        // The connection was lost: the task running the invocation is dropped.
        drop(running);
        until("the group is gone", || live_in_group(pgid).is_empty()).await;
        let _ = std::fs::remove_file(&file);
    }

    #[tokio::test]
    async fn what_a_finished_program_left_in_its_group_is_killed() {
        let file = scratch("leftover");
        // The background sleep keeps no pipe open, so only the group kill can end it.
        let text = format!(
            "sleep 300 >/dev/null 2>&1 & echo $$ > {}; echo done",
            file.display()
        );
        let out = run(&spec(&["sh", "-c", &text], false, 5000, 1024), &[])
            .await
            .expect("runs");
        assert_eq!(out.stdout, "done\n");
        let pgid = pgid_in(&file).expect("pgid");
        until("the background sleep is gone", || {
            live_in_group(pgid).is_empty()
        })
        .await;
        let _ = std::fs::remove_file(&file);
    }
}
