//! The client against small hostile servers on loopback addresses.

use super::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as a server saw it: request line and headers.
#[derive(Clone, Debug)]
struct Seen {
    target: String,
    headers: String,
}

type Handler = Arc<dyn Fn(&Seen) -> Vec<u8> + Send + Sync>;

/// A one-request-per-connection HTTP server on `ip`; counts requests.
struct Server {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    count: Arc<AtomicUsize>,
}

impl Server {
    async fn start(ip: &str, handler: Handler) -> Server {
        let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let (s2, c2) = (seen.clone(), count.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = l.accept().await else {
                    return;
                };
                let (seen, count, handler) = (s2.clone(), c2.clone(), handler.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut b = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&b[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let (line, headers) = text.split_once("\r\n").unwrap_or((&text, ""));
                    let req = Seen {
                        target: line.split_whitespace().nth(1).unwrap_or_default().into(),
                        headers: headers.to_ascii_lowercase(),
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    seen.lock().unwrap().push(req.clone());
                    let _ = sock.write_all(&handler(&req)).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Server { addr, seen, count }
    }
}

fn response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A body with no declared length, sent in chunks.
fn chunked(status: &str, body: &[u8]) -> Vec<u8> {
    let mut out =
        format!("HTTP/1.1 {status}\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n")
            .into_bytes();
    for c in body.chunks(8192) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A registry that answers every request with a Bearer challenge whose
/// realm is `http://{token_service}/token`.
async fn asking_for_a_token(token_service: std::net::SocketAddr) -> Server {
    let realm = format!("http://{token_service}/token");
    Server::start(
        "127.0.0.1",
        Arc::new(move |_| {
            let c = format!("Bearer realm=\"{realm}\",service=\"reg\"");
            response("401 Unauthorized", &[("www-authenticate", &c)], b"")
        }),
    )
    .await
}

fn client(addr: std::net::SocketAddr, creds: Creds) -> Client {
    Client::new(
        &addr.to_string(),
        Access {
            plain_http: true,
            loopback: true,
        },
        creds,
        Duration::from_secs(10),
        Duration::from_secs(30),
    )
    .unwrap()
}

const MANIFEST: &[u8] =
    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
const OCI: &str = "application/vnd.oci.image.manifest.v1+json";

#[tokio::test]
async fn tokens_come_from_a_realm_on_the_registry_host_and_are_reused() {
    let tokens = Server::start(
        "127.0.0.1",
        Arc::new(|_| response("200 OK", &[], br#"{"token":"t0k"}"#)),
    )
    .await;
    let realm = format!("http://{}/token", tokens.addr);
    let reg = Server::start(
        "127.0.0.1",
        Arc::new(move |r| {
            if r.headers.contains("authorization: bearer t0k") {
                response("200 OK", &[("content-type", OCI)], MANIFEST)
            } else {
                let c = format!(
                    "Bearer realm=\"{realm}\",service=\"reg\",scope=\"repository:app:pull\""
                );
                response("401 Unauthorized", &[("www-authenticate", &c)], b"")
            }
        }),
    )
    .await;
    let c = client(
        reg.addr,
        Creds::Basic {
            username: "u".into(),
            password: "p".into(),
        },
    );
    let m = c.manifest("app", "v1", &[OCI], 1 << 20).await.unwrap();
    assert_eq!(m.bytes, MANIFEST);
    assert_eq!(m.digest, sha256_digest(MANIFEST));
    assert_eq!(m.media_type.as_deref(), Some(OCI));
    let t = tokens.seen.lock().unwrap()[0].clone();
    assert!(t.target.contains("service=reg"), "{t:?}");
    assert!(t.target.contains("scope=repository%3Aapp%3Apull"), "{t:?}");
    // The configured credentials went to the token service.
    assert!(t.headers.contains("authorization: basic dtpw"), "{t:?}");
    // The token is kept for the scope: a second pull asks no new one.
    c.manifest("app", "v1", &[OCI], 1 << 20).await.unwrap();
    assert_eq!(tokens.count.load(Ordering::SeqCst), 1);
    // Asked by digest: checked.
    let by_digest = c
        .manifest("app", &sha256_digest(MANIFEST), &[OCI], 1 << 20)
        .await
        .unwrap();
    assert_eq!(by_digest.bytes, MANIFEST);
    let wrong = format!("sha256:{}", "0".repeat(64));
    let e = c
        .manifest("app", &wrong, &[OCI], 1 << 20)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Digest { .. }), "{e}");
}

#[tokio::test]
async fn a_realm_elsewhere_over_plain_http_is_never_requested() {
    // Another loopback address stands for "somewhere in the node's network".
    let elsewhere = Server::start(
        "127.0.0.2",
        Arc::new(|_| response("200 OK", &[], br#"{"token":"t"}"#)),
    )
    .await;
    let reg = asking_for_a_token(elsewhere.addr).await;
    let e = client(reg.addr, Creds::Anonymous)
        .manifest("app", "v1", &[OCI], 1 << 20)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Realm { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("neither HTTPS nor the registry's own host"),
        "{e}"
    );
    assert_eq!(elsewhere.count.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn reads_stop_at_their_caps_with_or_without_a_declared_length() {
    let big = vec![b'x'; 300 << 10];
    let body = big.clone();
    let reg = Server::start(
        "127.0.0.1",
        Arc::new(move |r| {
            if r.target.contains("declared") {
                response("200 OK", &[], &body)
            } else {
                chunked("200 OK", &body)
            }
        }),
    )
    .await;
    let c = client(reg.addr, Creds::Anonymous);
    for tag in ["declared", "chunked"] {
        let e = c.manifest("app", tag, &[OCI], 64 << 10).await.unwrap_err();
        assert_eq!(
            e,
            Error::TooLarge {
                registry: reg.addr.to_string(),
                what: "manifest",
                limit: 64 << 10
            },
            "{tag}"
        );
    }
    // A token service answering without end.
    let tokens = Server::start("127.0.0.1", Arc::new(move |_| chunked("200 OK", &big))).await;
    let reg = asking_for_a_token(tokens.addr).await;
    let e = client(reg.addr, Creds::Anonymous)
        .manifest("app", "v1", &[OCI], 1 << 20)
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::TooLarge { what: "token", limit, .. } if limit == TOKEN_LIMIT),
        "{e}"
    );
}

#[tokio::test]
async fn errors_carry_status_and_codes_never_bodies() {
    let reg = Server::start(
        "127.0.0.1",
        Arc::new(|r| {
            if r.target.contains("manifests/gone") {
                response(
                    "404 Not Found",
                    &[],
                    br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"node-secret-1"}]}"#,
                )
            } else {
                // Some other HTTP service on the node, with something to hide.
                response(
                    "500 Internal Server Error",
                    &[],
                    br#"{"errors":[{"code":"lower or <b>html</b>","message":"node-secret-2"}]} db_password=hunter2"#,
                )
            }
        }),
    )
    .await;
    let c = client(reg.addr, Creds::Anonymous);
    let e = c
        .manifest("app", "gone", &[OCI], 1 << 20)
        .await
        .unwrap_err();
    assert!(e.is_not_found());
    assert_eq!(
        e.to_string(),
        format!(
            "registry {} has no manifest app:gone: MANIFEST_UNKNOWN",
            reg.addr
        )
    );
    let e = c.manifest("app", "v1", &[OCI], 1 << 20).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("registry {} answered HTTP 500", reg.addr)
    );
    let e = c.blob("app", "sha256:abc").await.err().unwrap();
    assert!(
        !e.to_string().contains("secret") && !e.to_string().contains("hunter2"),
        "{e}"
    );
}

#[tokio::test]
async fn blob_redirects_stay_on_https_or_the_registry_host() {
    let storage_elsewhere =
        Server::start("127.0.0.2", Arc::new(|_| response("200 OK", &[], b"blob"))).await;
    let storage_here =
        Server::start("127.0.0.1", Arc::new(|_| response("200 OK", &[], b"blob"))).await;
    let (far, near) = (storage_elsewhere.addr, storage_here.addr);
    let reg = Server::start(
        "127.0.0.1",
        Arc::new(move |r| {
            let to = if r.target.contains("far") {
                format!("http://{far}/b")
            } else {
                format!("http://{near}/b")
            };
            response("307 Temporary Redirect", &[("location", &to)], b"")
        }),
    )
    .await;
    let c = client(reg.addr, Creds::Anonymous);
    let mut b = c.blob("app", "sha256:near").await.unwrap();
    assert_eq!(b.declared_len(), Some(4));
    assert_eq!(b.chunk().await.unwrap().unwrap(), b"blob");
    let e = c.blob("app", "sha256:far").await.err().unwrap();
    assert!(matches!(e, Error::Net { .. }), "{e}");
    assert!(e.to_string().contains("refused"), "{e}");
    assert_eq!(storage_elsewhere.count.load(Ordering::SeqCst), 0);
    assert_eq!(storage_here.count.load(Ordering::SeqCst), 1);
}

#[test]
fn challenges_parse_with_quoted_commas() {
    let c = parse_challenge(
        r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push""#,
    )
    .unwrap();
    assert_eq!(c.scheme, "bearer");
    assert_eq!(c.params["realm"], "https://auth.example/token");
    assert_eq!(c.params["scope"], "repository:a/b:pull,push");
    assert_eq!(
        parse_challenge("Basic realm=x").unwrap().params["realm"],
        "x"
    );
    assert_eq!(host_of("[::1]:5000"), "::1");
    assert_eq!(host_of("reg.example:443"), "reg.example");
    let https = Url::parse("https://other.example/t").unwrap();
    let plain_here = Url::parse("http://reg.example:9/t").unwrap();
    let plain_there = Url::parse("http://10.0.0.1/t").unwrap();
    let open = Access {
        plain_http: false,
        loopback: true,
    };
    assert!(safe_target(&https, "reg.example", open));
    assert!(safe_target(&plain_here, "reg.example", open));
    assert!(!safe_target(&plain_there, "reg.example", open));
    // Without loopback access, nothing on loopback, HTTPS or not.
    let remote = Access::default();
    assert!(safe_target(&https, "reg.example", remote));
    for url in [
        "https://127.0.0.1:2379/v2/keys",
        "https://localhost/t",
        "https://[::1]/t",
        "https://0.0.0.0/t",
    ] {
        let url = Url::parse(url).unwrap();
        assert!(!safe_target(&url, "reg.example", remote), "{url}");
        assert!(safe_target(&url, "reg.example", open), "{url}");
    }
}

/// Issue 14 item 12: a reference naming a loopback registry reaches it only
/// when the operator's config allows loopback — never because a manifest
/// says so — whether it names a literal address or `localhost`.
#[tokio::test]
async fn a_registry_on_loopback_is_refused_unless_configured() {
    let reg = Server::start(
        "127.0.0.1",
        Arc::new(|_| response("200 OK", &[("content-type", OCI)], MANIFEST)),
    )
    .await;
    let port = reg.addr.port();
    for name in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let e = Client::new(
            &name,
            Access {
                plain_http: true,
                loopback: false,
            },
            Creds::Anonymous,
            Duration::from_secs(10),
            Duration::from_secs(30),
        )
        .err()
        .unwrap_or_else(|| panic!("{name} was accepted"));
        assert_eq!(
            e,
            Error::Loopback {
                registry: name.clone()
            }
        );
        assert!(e.to_string().contains("--registry-config"), "{e}");
    }
    assert_eq!(reg.count.load(Ordering::SeqCst), 0);
    // Configured: the same registry answers.
    let m = client(reg.addr, Creds::Anonymous)
        .manifest("app", "v1", &[OCI], 1 << 20)
        .await
        .unwrap();
    assert_eq!(m.bytes, MANIFEST);
    assert_eq!(reg.count.load(Ordering::SeqCst), 1);
}

/// A name that resolves only to loopback is refused at connect time without
/// loopback access, so a registry name cannot reach the node's own ports
/// through DNS either.
#[tokio::test]
async fn a_name_resolving_only_to_loopback_is_refused_without_loopback_access() {
    use reqwest::dns::Resolve as _;
    // `localhost` stands for any name whose answers are all loopback (the
    // literal-name check is bypassed by calling the resolver directly).
    let Err(e) = NoLoopback.resolve("localhost".parse().unwrap()).await else {
        panic!("localhost resolved without a refusal");
    };
    assert!(e.to_string().contains("resolves only to loopback"), "{e}");
}

/// A realm or redirect on loopback over HTTPS is refused without a request
/// when the registry itself is remote.
#[tokio::test]
async fn a_realm_on_loopback_is_refused_for_a_remote_registry() {
    let c = Client::new(
        "reg.example",
        Access::default(),
        Creds::Anonymous,
        Duration::from_secs(10),
        Duration::from_secs(30),
    )
    .unwrap();
    let e = c
        .answer(
            Some(r#"Bearer realm="https://127.0.0.1:2379/v2/keys",service="x""#),
            "repository:a:pull",
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Realm { .. }), "{e}");
}
