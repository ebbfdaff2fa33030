//! A function: a component of the standard `wasi:http/proxy` world
//! (`wit/http/world.wit`), served one fresh instance per request.
//!
//! What it answers depends on the path (the part after the last route
//! prefix does not matter; only the final segment is looked at):
//! - `…/echo`: the request's body streamed back as it arrives;
//! - `…/trap`: traps (`unreachable`) before answering;
//! - `…/spin`: never answers, spinning;
//! - `…/hog`: grows its memory until the limit stops it;
//! - `…/sleep?ms=N`: answers after N ms (waiting on a WASI clock);
//! - `…/count`: how many requests this instance has seen (always 1 when
//!   every request gets a fresh instance);
//! - `…/env?name=K`: the value of variable K;
//! - `…/log`: writes two lines to stdout and one to stderr, then answers;
//! - anything else: `hello from NAME` (`$GREETING`, default `function`),
//!   with the method, the authority and the path it saw.

use std::sync::atomic::{AtomicU32, Ordering};

wit_bindgen::generate!({
    path: "../../wit/http",
    world: "flotilla:function/function",
    generate_all,
    features: ["clocks-timezone"],
});

use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

static SEEN: AtomicU32 = AtomicU32::new(0);

struct Function;

fn query<'a>(path: &'a str, key: &str) -> Option<&'a str> {
    let (_, q) = path.split_once('?')?;
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Starts a response with `status` and returns its body.
fn respond(out: ResponseOutparam, status: u16, content_type: &str) -> OutgoingBody {
    let headers = Fields::new();
    headers
        .set("content-type", &[content_type.as_bytes().to_vec()])
        .expect("content-type is allowed");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("a valid status");
    let body = response.body().expect("the body is taken once");
    ResponseOutparam::set(out, Ok(response));
    body
}

fn send(out: ResponseOutparam, status: u16, text: &str) {
    let body = respond(out, status, "text/plain");
    {
        let stream = body.write().expect("the stream is taken once");
        for chunk in text.as_bytes().chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .expect("the client is there");
        }
    }
    OutgoingBody::finish(body, None).expect("the body is complete");
}

fn echo(request: IncomingRequest, out: ResponseOutparam) {
    let incoming = request.consume().expect("the body is taken once");
    let input = incoming.stream().expect("the stream is taken once");
    let body = respond(out, 200, "application/octet-stream");
    {
        let output = body.write().expect("the stream is taken once");
        loop {
            match input.blocking_read(64 << 10) {
                Ok(chunk) => {
                    for part in chunk.chunks(4096) {
                        output
                            .blocking_write_and_flush(part)
                            .expect("the client is there");
                    }
                }
                Err(_) => break,
            }
        }
    }
    OutgoingBody::finish(body, None).expect("the body is complete");
}

impl exports::wasi::http::incoming_handler::Guest for Function {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let seen = SEEN.fetch_add(1, Ordering::SeqCst) + 1;
        let path = request.path_with_query().unwrap_or_default();
        let base = path.split('?').next().unwrap_or("");
        let last = base.rsplit('/').next().unwrap_or("");
        match last {
            "echo" => echo(request, out),
            "trap" => core::arch::wasm32::unreachable(),
            "spin" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "hog" => {
                let mut held: Vec<Vec<u8>> = Vec::new();
                loop {
                    held.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&held);
                }
            }
            "sleep" => {
                let ms: u64 = query(&path, "ms").and_then(|v| v.parse().ok()).unwrap_or(0);
                wasi::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
                send(out, 200, &format!("slept {ms} ms\n"));
            }
            "count" => send(out, 200, &format!("{seen}\n")),
            "log" => {
                println!("first line for {path}");
                print!("second line, ");
                println!("written in two parts");
                eprintln!("and one on stderr");
                send(out, 200, "logged\n");
            }
            "env" => {
                let name = query(&path, "name").unwrap_or("");
                match std::env::var(name) {
                    Ok(v) => send(out, 200, &format!("{v}\n")),
                    Err(_) => send(out, 404, &format!("no variable {name}\n")),
                }
            }
            _ => {
                let greeting = std::env::var("GREETING").unwrap_or_else(|_| "function".into());
                let method = match request.method() {
                    wasi::http::types::Method::Get => "GET".to_string(),
                    wasi::http::types::Method::Post => "POST".to_string(),
                    wasi::http::types::Method::Put => "PUT".to_string(),
                    wasi::http::types::Method::Delete => "DELETE".to_string(),
                    wasi::http::types::Method::Other(m) => m,
                    other => format!("{other:?}"),
                };
                let authority = request.authority().unwrap_or_default();
                send(
                    out,
                    200,
                    &format!("hello from {greeting}: {method} {authority} {path}\n"),
                );
            }
        }
    }
}

export!(Function);

fn main() {}
