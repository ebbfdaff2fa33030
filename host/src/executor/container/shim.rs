//! `flotilla shim`: one small process per container. It starts the container
//! with `runc run --detach`, becomes its parent (child subreaper), copies its
//! stdout/stderr into the member's log, reaps it, records how it ended, and
//! removes it from runc. It runs in its own process group and outlives the
//! agent: a restarted agent finds it through `state.json` and waits for it.
//!
//! Files in the container's directory:
//! - `state.json` — written once the container runs: shim and container PIDs,
//!   start time, restart count (what an agent needs to re-adopt it).
//! - `exit.json` — written when the container has ended and been deleted.
//! - `runc.log` — runc's own log (JSON lines), for start errors.
//!
//! The agent learns the outcome of the start from the first line the shim
//! prints on its stdout (`ok PID` or `err MESSAGE`), then the shim closes it.

use crate::logs::{LogPaths, LogSink};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What the shim is told.
#[derive(Clone, Debug)]
pub struct ShimArgs {
    pub id: String,
    /// The container's directory (holds `bundle/`, state and exit files).
    pub dir: PathBuf,
    pub runc: PathBuf,
    pub runc_root: PathBuf,
    /// The pod's log directory and the member whose log this is.
    pub log_dir: PathBuf,
    pub member: String,
    pub log_cap: u64,
    pub restarts: u32,
    /// Cgroup path given in the spec (for the OOM counter).
    pub cgroup: String,
}

impl ShimArgs {
    /// The command line that runs the shim (`flotilla shim …`).
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "shim".into(),
            "--id".into(),
            self.id.clone(),
            "--dir".into(),
            self.dir.display().to_string(),
            "--runc".into(),
            self.runc.display().to_string(),
            "--runc-root".into(),
            self.runc_root.display().to_string(),
            "--log-dir".into(),
            self.log_dir.display().to_string(),
            "--member".into(),
            self.member.clone(),
            "--log-cap".into(),
            self.log_cap.to_string(),
            "--restarts".into(),
            self.restarts.to_string(),
            "--cgroup".into(),
            self.cgroup.clone(),
        ]
    }

    /// Parses what `to_args` wrote (after `shim`).
    pub fn parse(args: &[String]) -> Result<ShimArgs, String> {
        let get = |name: &str| -> Result<String, String> {
            let i = args
                .iter()
                .position(|a| a == name)
                .ok_or_else(|| format!("missing {name}"))?;
            args.get(i + 1)
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        Ok(ShimArgs {
            id: get("--id")?,
            dir: get("--dir")?.into(),
            runc: get("--runc")?.into(),
            runc_root: get("--runc-root")?.into(),
            log_dir: get("--log-dir")?.into(),
            member: get("--member")?,
            log_cap: get("--log-cap")?.parse().map_err(|_| "bad --log-cap")?,
            restarts: get("--restarts")?.parse().map_err(|_| "bad --restarts")?,
            cgroup: get("--cgroup")?,
        })
    }
}

/// A running container, as the shim records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimState {
    pub shim_pid: i32,
    pub pid: i32,
    pub started_ms: u64,
    pub restarts: u32,
}

/// How a container ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimExit {
    /// Exit code, or 128 + signal.
    pub code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The kernel OOM-killed a process in the container's cgroup.
    #[serde(default)]
    pub oom_killed: bool,
    /// Set when the container never started.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub start_error: String,
    pub finished_ms: u64,
}

pub const STATE_FILE: &str = "state.json";
pub const EXIT_FILE: &str = "exit.json";

/// Writes `value` as JSON to `dir/name` atomically.
pub fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(name))
}

pub fn read_json<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> Option<T> {
    serde_json::from_slice(&std::fs::read(dir.join(name)).ok()?).ok()
}

/// The last error runc logged (its log is JSON lines with `level` and `msg`).
pub fn runc_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v["level"] == "error" || v["level"] == "fatal")
            .then(|| v["msg"].as_str().unwrap_or_default().to_string())
    })
}

/// Whether the kernel OOM-killed something in the cgroup (v1 or v2).
pub fn oom_killed(cgroup: &str) -> bool {
    let rel = cgroup.trim_start_matches('/');
    let counter = |file: PathBuf| {
        std::fs::read_to_string(file).ok().and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
        })
    };
    let v1 = counter(
        Path::new("/sys/fs/cgroup/memory")
            .join(rel)
            .join("memory.oom_control"),
    );
    let v2 = counter(Path::new("/sys/fs/cgroup").join(rel).join("memory.events"));
    v1.or(v2).is_some_and(|n| n > 0)
}

fn now_ms() -> u64 {
    flotilla_api::time::now_ms()
}

/// The shim's main; returns the process exit code.
pub fn run(args: ShimArgs) -> i32 {
    let mut out = std::io::stdout();
    match start(&args) {
        Ok((pid, pipes)) => {
            let _ = writeln!(out, "ok {pid}");
            let _ = out.flush();
            // Nothing more goes to the agent; a dead agent's pipe must not matter.
            if let Ok(null) = std::fs::File::open("/dev/null") {
                let _ = rustix::stdio::dup2_stdout(&null);
            }
            supervise(&args, pid, pipes);
            0
        }
        Err(message) => {
            let _ = write_json(
                &args.dir,
                EXIT_FILE,
                &ShimExit {
                    code: -1,
                    signal: None,
                    oom_killed: false,
                    start_error: message.clone(),
                    finished_ms: now_ms(),
                },
            );
            let _ = writeln!(out, "err {}", message.replace('\n', " "));
            1
        }
    }
}

type LogThreads = Vec<std::thread::JoinHandle<()>>;

/// Starts the container; returns its PID and the threads copying its output.
fn start(args: &ShimArgs) -> Result<(i32, LogThreads), String> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .map_err(|e| format!("cannot become a subreaper: {e}"))?;
    let (out_r, out_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("pipe: {e}"))?;
    let (err_r, err_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("pipe: {e}"))?;
    let paths = LogPaths::new(&args.log_dir, &args.member);
    let sink = LogSink::new(paths, args.log_cap);
    let mut threads = Vec::new();
    for r in [out_r, err_r] {
        let sink = sink.clone();
        threads.push(std::thread::spawn(move || {
            let mut f = std::fs::File::from(r);
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match f.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let _ = sink.write_all(&buf[..n]);
                    }
                }
            }
        }));
    }
    let pid_file = args.dir.join("container.pid");
    let _ = std::fs::remove_file(&pid_file);
    let log = args.dir.join("runc.log");
    let status = Command::new(&args.runc)
        .arg("--root")
        .arg(&args.runc_root)
        .arg("--log")
        .arg(&log)
        .args(["--log-format", "json", "run", "--detach", "--bundle"])
        .arg(args.dir.join("bundle"))
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(&args.id)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w))
        .status()
        .map_err(|e| format!("cannot run {}: {e}", args.runc.display()))?;
    if !status.success() {
        let why = runc_error(&log).unwrap_or_else(|| format!("runc run exited with {status}"));
        delete(args);
        for t in threads {
            let _ = t.join();
        }
        return Err(why);
    }
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or("runc wrote no container pid")?;
    let state = ShimState {
        shim_pid: rustix::process::getpid().as_raw_nonzero().get(),
        pid,
        started_ms: now_ms(),
        restarts: args.restarts,
    };
    write_json(&args.dir, STATE_FILE, &state).map_err(|e| format!("writing state: {e}"))?;
    Ok((pid, threads))
}

/// Reaps the container, records its end, and removes it from runc.
fn supervise(args: &ShimArgs, pid: i32, threads: LogThreads) {
    let mut code = -1;
    let mut signal = None;
    loop {
        match rustix::process::wait(rustix::process::WaitOptions::empty()) {
            Ok(Some((p, status))) => {
                if p.as_raw_nonzero().get() != pid {
                    continue;
                }
                if let Some(c) = status.exit_status() {
                    code = c;
                } else if let Some(s) = status.terminating_signal() {
                    signal = Some(s);
                    code = 128 + s;
                }
                break;
            }
            Ok(None) => continue,
            Err(rustix::io::Errno::INTR) => continue,
            // No children left: the container is gone without our seeing it.
            Err(_) => break,
        }
    }
    let oom = oom_killed(&args.cgroup);
    delete(args);
    for t in threads {
        let _ = t.join();
    }
    let _ = write_json(
        &args.dir,
        EXIT_FILE,
        &ShimExit {
            code,
            signal,
            oom_killed: oom,
            start_error: String::new(),
            finished_ms: now_ms(),
        },
    );
}

/// `runc delete --force`: kills what is left and frees the cgroup.
fn delete(args: &ShimArgs) {
    let _ = Command::new(&args.runc)
        .arg("--root")
        .arg(&args.runc_root)
        .args(["delete", "--force"])
        .arg(&args.id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Reads the shim's first line (`ok PID` / `err MESSAGE`).
pub fn parse_handshake(line: &str) -> Result<i32, String> {
    let line = line.trim_end();
    if let Some(pid) = line.strip_prefix("ok ") {
        return pid.parse().map_err(|_| format!("shim said '{line}'"));
    }
    if let Some(msg) = line.strip_prefix("err ") {
        return Err(msg.to_string());
    }
    Err(if line.is_empty() {
        "the shim exited before starting the container".into()
    } else {
        format!("unexpected shim output '{line}'")
    })
}

/// Reads one line from a reader (used by tests of the handshake).
pub fn first_line(r: impl Read) -> String {
    let mut s = String::new();
    let _ = std::io::BufReader::new(r).read_line(&mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let a = ShimArgs {
            id: "uid-web".into(),
            dir: "/d/c/uid-web".into(),
            runc: "/usr/sbin/runc".into(),
            runc_root: "/d/c/.runc".into(),
            log_dir: "/d/logs/uid".into(),
            member: "web".into(),
            log_cap: 1 << 20,
            restarts: 3,
            cgroup: "/flotilla/uid-web".into(),
        };
        let argv = a.to_args();
        assert_eq!(argv[0], "shim");
        let b = ShimArgs::parse(&argv[1..]).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert!(ShimArgs::parse(&argv[3..]).unwrap_err().contains("--id"));
    }

    #[test]
    fn handshake_lines() {
        assert_eq!(parse_handshake("ok 4242\n"), Ok(4242));
        assert_eq!(
            parse_handshake("err exec: \"/nope\": no such file\n"),
            Err("exec: \"/nope\": no such file".to_string())
        );
        assert!(parse_handshake("").unwrap_err().contains("exited"));
        assert!(first_line(&b"ok 1\nrest"[..]) == "ok 1\n");
    }

    #[test]
    fn runc_errors_come_from_its_json_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("runc.log");
        std::fs::write(
            &log,
            "{\"level\":\"warning\",\"msg\":\"meh\"}\n{\"level\":\"error\",\"msg\":\"exec failed: no such file\"}\n{\"level\":\"info\",\"msg\":\"bye\"}\n",
        )
        .unwrap();
        assert_eq!(
            runc_error(&log).as_deref(),
            Some("exec failed: no such file")
        );
        assert_eq!(runc_error(&dir.path().join("none")), None);
    }

    #[test]
    fn state_files_are_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let e = ShimExit {
            code: 137,
            signal: Some(9),
            oom_killed: true,
            start_error: String::new(),
            finished_ms: 5,
        };
        write_json(dir.path(), EXIT_FILE, &e).unwrap();
        assert_eq!(read_json::<ShimExit>(dir.path(), EXIT_FILE), Some(e));
        assert!(!dir.path().join("exit.json.tmp").exists());
        assert_eq!(read_json::<ShimState>(dir.path(), STATE_FILE), None);
    }
}
