//! Per-member log files: stdout and stderr of every run, size-capped and rotated.
//!
//! Layout under the agent's log directory: `<pod-uid>/<member>.log` for the
//! current run, `<member>.log.1` for the rotated older part of it, and
//! `<member>.previous.log` for the run before (what `logs --previous` shows).

use bytes::Bytes;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// Where a member's logs live.
#[derive(Clone, Debug)]
pub struct LogPaths {
    pub current: PathBuf,
    pub rotated: PathBuf,
    pub previous: PathBuf,
}

impl LogPaths {
    pub fn new(dir: &Path, member: &str) -> LogPaths {
        LogPaths {
            current: dir.join(format!("{member}.log")),
            rotated: dir.join(format!("{member}.log.1")),
            previous: dir.join(format!("{member}.previous.log")),
        }
    }

    /// Moves the finished run's log aside as "previous" before a restart.
    pub fn start_new_run(&self) -> io::Result<()> {
        if self.current.exists() {
            let _ = fs::remove_file(&self.rotated);
            fs::rename(&self.current, &self.previous)?;
        }
        Ok(())
    }
}

struct Inner {
    paths: LogPaths,
    file: Option<File>,
    size: u64,
    cap: u64,
}

impl Inner {
    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.size + buf.len() as u64 > self.cap && self.size > 0 {
            // Keep one older segment; the total stays under about twice the cap.
            self.file = None;
            fs::rename(&self.paths.current, &self.paths.rotated)?;
            self.size = 0;
        }
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.paths.current)?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        self.file.as_mut().expect("opened above").write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }
}

/// The sink a member's stdout and stderr both write to. Cheap to clone.
#[derive(Clone)]
pub struct LogSink {
    inner: Arc<Mutex<Inner>>,
    /// Lines written through this clone get a tag (a function's request).
    tag: Option<Arc<Tagged>>,
}

/// Most bytes of an unfinished line a tagged sink holds back.
const MAX_PENDING_LINE: usize = 16 * 1024;

/// A tag and the unfinished line written under it: whole lines go to the
/// log, each with the tag, so two requests' output never mixes within a
/// line; what is left when the last clone goes is written then.
struct Tagged {
    prefix: Mutex<Vec<u8>>,
    pending: Mutex<Vec<u8>>,
    inner: Arc<Mutex<Inner>>,
}

impl Tagged {
    /// Writes the complete lines of `pending` (all of it when `all`).
    fn emit(&self, pending: &mut Vec<u8>, all: bool) -> io::Result<()> {
        let cut = if all || pending.len() > MAX_PENDING_LINE {
            pending.len()
        } else {
            pending
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1)
        };
        if cut == 0 {
            return Ok(());
        }
        let prefix = self.prefix.lock().expect("poisoned").clone();
        let mut out = Vec::with_capacity(cut + prefix.len() * 4);
        for line in pending[..cut].split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(&prefix);
            out.extend_from_slice(line);
            if !line.ends_with(b"\n") {
                out.push(b'\n');
            }
        }
        pending.drain(..cut);
        self.inner.lock().expect("log sink poisoned").write(&out)
    }
}

impl Drop for Tagged {
    fn drop(&mut self) {
        let mut pending = std::mem::take(&mut *self.pending.lock().expect("poisoned"));
        let _ = self.emit(&mut pending, true);
    }
}

impl LogSink {
    /// Opens (lazily) the current log of a member; `cap` bounds one segment in bytes.
    pub fn new(paths: LogPaths, cap: u64) -> LogSink {
        LogSink {
            inner: Arc::new(Mutex::new(Inner {
                paths,
                file: None,
                size: 0,
                cap: cap.max(1024),
            })),
            tag: None,
        }
    }

    /// The same log, each line written through the result (and its
    /// clones) starting with `tag`: a function's instance writes
    /// `[req ID] …`.
    pub fn tagged(&self, tag: &str) -> LogSink {
        LogSink {
            inner: self.inner.clone(),
            tag: Some(Arc::new(Tagged {
                prefix: Mutex::new(tag.as_bytes().to_vec()),
                pending: Mutex::default(),
                inner: self.inner.clone(),
            })),
        }
    }

    /// A tagged sink's lines from now on start with `tag`; an unfinished
    /// line is written first, under the old one (a reused instance moving
    /// on to its next request).
    pub fn retag(&self, tag: &str) {
        if let Some(t) = &self.tag {
            let mut pending = t.pending.lock().expect("poisoned");
            let _ = t.emit(&mut pending, true);
            *t.prefix.lock().expect("poisoned") = tag.as_bytes().to_vec();
        }
    }

    pub fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match &self.tag {
            None => self.inner.lock().expect("log sink poisoned").write(buf),
            Some(t) => {
                let mut pending = t.pending.lock().expect("poisoned");
                pending.extend_from_slice(buf);
                t.emit(&mut pending, false)
            }
        }
    }
}

impl IsTerminal for LogSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogSink {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LogSink {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_all(&bytes)
            .map_err(|e| StreamError::LastOperationFailed(e.into()))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogSink {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogSink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(self.write_all(buf).map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Reads what is currently logged: the rotated part then the current part, or
/// the previous run's log. `tail` keeps only the last lines.
pub fn read_log(paths: &LogPaths, previous: bool, tail: Option<u64>) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    if previous {
        out = fs::read(&paths.previous).map_err(|e| {
            io::Error::new(e.kind(), "no previous run has been logged for this member")
        })?;
    } else {
        for p in [&paths.rotated, &paths.current] {
            match fs::read(p) {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    if let Some(t) = tail {
        // Start after the (t+1)-th newline from the end (a final newline ends the last line).
        let body = out.strip_suffix(b"\n").unwrap_or(&out);
        let start = body
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, b)| **b == b'\n')
            .nth(t.saturating_sub(1) as usize)
            .map_or(0, |(i, _)| i + 1);
        if t == 0 {
            out.clear();
        } else {
            out.drain(..start);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_the_cap_and_keeps_the_previous_run() {
        let dir = tempfile::tempdir().unwrap();
        let paths = LogPaths::new(dir.path(), "m");
        let sink = LogSink::new(paths.clone(), 1024);
        for i in 0..300 {
            sink.write_all(format!("line {i:04}\n").as_bytes()).unwrap();
        }
        let cur = fs::metadata(&paths.current).unwrap().len();
        let rot = fs::metadata(&paths.rotated).unwrap().len();
        assert!(cur <= 1024 && rot <= 1024, "{cur} {rot}");
        let all = read_log(&paths, false, None).unwrap();
        assert!(String::from_utf8(all).unwrap().ends_with("line 0299\n"));
        let tail = read_log(&paths, false, Some(2)).unwrap();
        assert_eq!(tail, b"line 0298\nline 0299\n");
        assert_eq!(read_log(&paths, false, Some(1)).unwrap(), b"line 0299\n");
        assert!(read_log(&paths, false, Some(0)).unwrap().is_empty());

        paths.start_new_run().unwrap();
        let sink = LogSink::new(paths.clone(), 1024);
        sink.write_all(b"second run\n").unwrap();
        assert_eq!(read_log(&paths, false, None).unwrap(), b"second run\n");
        assert!(
            read_log(&paths, true, None)
                .unwrap()
                .ends_with(b"line 0299\n")
        );
    }

    #[test]
    fn a_tagged_sink_starts_every_line_with_its_tag() {
        let dir = tempfile::tempdir().unwrap();
        let paths = LogPaths::new(dir.path(), "fn");
        let sink = LogSink::new(paths.clone(), 1 << 20);
        let (a, b) = (sink.tagged("[req 1] "), sink.tagged("[req 2] "));
        // Lines split over writes keep one tag, and another request's line
        // does not land inside one; an empty line gets a tag too.
        a.write_all(b"hel").unwrap();
        a.write_all(b"lo\n\nsecond\nthi").unwrap();
        b.write_all(b"from b\n").unwrap();
        a.write_all(b"rd\n").unwrap();
        sink.write_all(b"untagged\n").unwrap();
        // A new tag: what is unfinished goes under the old one.
        b.write_all(b"half").unwrap();
        b.retag("[req 3] ");
        b.write_all(b"after\n").unwrap();
        // An unfinished line is written when its writer goes.
        a.write_all(b"no newline").unwrap();
        drop(a);
        assert_eq!(
            String::from_utf8(read_log(&paths, false, None).unwrap()).unwrap(),
            "[req 1] hello\n[req 1] \n[req 1] second\n[req 2] from b\n[req 1] third\nuntagged\n[req 2] half\n[req 3] after\n[req 1] no newline\n"
        );
    }
}
