//! A small tool for config, secret and volume tests. Its arguments are
//! commands separated by `;`, run in order, each printing one line:
//!
//! - `env`: every variable, sorted, as `env: K=V`
//! - `cat PATH`: `cat PATH: CONTENT` (or `cat PATH: error: …`)
//! - `write PATH TEXT`: `wrote PATH` or `write PATH: error: …`
//! - `wait PATH`: waits (up to 120 s) for PATH to exist, then as `cat`
//! - `watch PATH TEXT`: waits (up to 120 s) until PATH holds TEXT: `saw TEXT`
//! - `ls PATH`: `ls PATH: A B …` (sorted)
//! - `fill PATH BYTES`: writes BYTES zero bytes: `filled PATH` or an error
//! - `sleep SECONDS`: `slept`
//! - `bench PATH MIB`: writes MIB MiB to PATH in 1 MiB writes, then reads
//!   it back: `bench write_us=… read_us=…` (timed inside the guest)
//! - `mirror FROM TO`: forever, copies FROM to TO (by rename) whenever
//!   FROM's content changes, polling every millisecond

use std::time::{Duration, Instant};

fn cat(path: &str) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => format!("cat {path}: {}", s.trim_end()),
        Err(e) => format!("cat {path}: error: {e}"),
    }
}

fn poll(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn run(cmd: &[String]) -> String {
    match cmd {
        [c] if c == "env" => {
            let mut vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
            vars.sort();
            format!("env: {}", vars.join(" "))
        }
        [c, path] if c == "cat" => cat(path),
        [c, path] if c == "wait" => {
            if poll(|| std::fs::metadata(path).is_ok()) {
                cat(path)
            } else {
                format!("wait {path}: timed out")
            }
        }
        [c, path, text] if c == "watch" => {
            let seen = poll(|| std::fs::read_to_string(path).is_ok_and(|s| s.trim_end() == text));
            if seen {
                format!("saw {text}")
            } else {
                format!("watch {path}: timed out")
            }
        }
        [c, path, text] if c == "write" => match std::fs::write(path, text) {
            Ok(()) => format!("wrote {path}"),
            Err(e) => format!("write {path}: error: {e}"),
        },
        [c, path, n] if c == "fill" => {
            let n: usize = n.parse().unwrap_or(0);
            match std::fs::write(path, vec![0u8; n]) {
                Ok(()) => format!("filled {path}"),
                Err(e) => format!("fill {path}: error: {e}"),
            }
        }
        [c, secs] if c == "sleep" => {
            std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(1)));
            "slept".into()
        }
        [c, path, mib] if c == "bench" => {
            use std::io::{Read, Write};
            let mib: usize = mib.parse().unwrap_or(1);
            let chunk = vec![7u8; 1 << 20];
            let t = Instant::now();
            let mut f = std::fs::File::create(path).expect("create");
            for _ in 0..mib {
                f.write_all(&chunk).expect("write");
            }
            f.sync_all().expect("sync");
            drop(f);
            let write = t.elapsed();
            let t = Instant::now();
            let mut f = std::fs::File::open(path).expect("open");
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0;
            loop {
                let n = f.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                total += n;
            }
            let read = t.elapsed();
            assert_eq!(total, mib << 20);
            format!(
                "bench write_us={} read_us={}",
                write.as_micros(),
                read.as_micros()
            )
        }
        [c, from, to] if c == "mirror" => {
            let tmp = format!("{to}.tmp");
            let mut last = None;
            loop {
                let now = std::fs::read(from).ok();
                if now.is_some() && now != last {
                    if let Some(b) = &now {
                        let _ = std::fs::write(&tmp, b).and_then(|()| std::fs::rename(&tmp, to));
                    }
                    last = now;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        [c, path] if c == "ls" => match std::fs::read_dir(path) {
            Ok(d) => {
                let mut names: Vec<String> = d
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                format!("ls {path}: {}", names.join(" "))
            }
            Err(e) => format!("ls {path}: error: {e}"),
        },
        other => format!("unknown command: {other:?}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    for cmd in args.split(|a| a == ";") {
        if !cmd.is_empty() {
            println!("{}", run(cmd));
        }
    }
}
