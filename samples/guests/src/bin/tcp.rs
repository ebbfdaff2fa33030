//! A small TCP tool for pod-network tests (wasm32-wasip2: WASI sockets).
//!
//! `tcp serve PORT`: answers each line received with `wasm got: LINE`.
//! `tcp send HOST:PORT TEXT`: connects (retrying for up to 10 s), sends TEXT,
//! closes its side and prints every line of the reply as `reply: LINE`.
//! `tcp http PORT N`: an HTTP server whose first N requests are answered
//! `200 OK` and every later one `500` (a member that falls sick while it
//! keeps running, for probe tests); `N` = `-`: always `200`. The body is
//! `$VERSION` (or `ok`) and a newline; `QUIET=1` logs no request;
//! `BURN_MS=N` spins for N ms of wall time before answering each request
//! (a CPU-bound service, for autoscaling).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn serve(port: u16) {
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    println!("listening on {port}");
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let mut out = &conn;
        for line in BufReader::new(&conn).lines() {
            let Ok(line) = line else { break };
            if writeln!(out, "wasm got: {line}").is_err() {
                break;
            }
        }
    }
}

fn http(port: u16, healthy: u64) {
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    let body = format!(
        "{}\n",
        std::env::var("VERSION").unwrap_or_else(|_| "ok".into())
    );
    let quiet = std::env::var("QUIET").is_ok_and(|v| v == "1");
    let burn = Duration::from_millis(
        std::env::var("BURN_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    println!("serving http on {port}");
    let mut served = 0u64;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let mut request = String::new();
        for line in BufReader::new(&conn).lines() {
            let Ok(line) = line else { break };
            if line.is_empty() {
                break;
            }
            if request.is_empty() {
                request = line;
            }
        }
        served += 1;
        // Only requests burn (a tcp probe connects and sends nothing).
        let t = Instant::now();
        let mut x = served;
        while !request.is_empty() && t.elapsed() < burn {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let status = if served <= healthy {
            "200 OK"
        } else {
            "500 Internal Server Error"
        };
        if !quiet {
            println!("{request} -> {status}");
        }
        let mut out = &conn;
        let _ = write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

fn send(addr: &str, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        match TcpStream::connect(addr) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                eprintln!("connect {addr}: {e}");
                std::process::exit(2);
            }
        }
    };
    conn.write_all(text.as_bytes()).expect("write");
    let _ = conn.shutdown(Shutdown::Write);
    let mut reply = String::new();
    conn.read_to_string(&mut reply).expect("read");
    for line in reply.lines() {
        println!("reply: {line}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(args[2].parse().expect("port")),
        Some("send") => send(&args[2], &args[3]),
        Some("http") => http(
            args[2].parse().expect("port"),
            match args[3].as_str() {
                "-" => u64::MAX,
                n => n.parse().expect("count"),
            },
        ),
        _ => {
            eprintln!("usage: tcp serve PORT | tcp send HOST:PORT TEXT | tcp http PORT N");
            std::process::exit(2);
        }
    }
}
