use super::*;
use bytes::Bytes;
use flotilla_api::Secret;
use flotilla_api::function::{GATEWAY_TLS_LABEL, Route};
use http_body_util::{BodyExt, Full};

/// A self-signed certificate for `names` as a gateway-tls Secret in
/// `namespace`, and the certificate's DER for a client to trust.
fn secret(namespace: &str, name: &str, names: &[&str]) -> (Object, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    let mut s = Secret::default();
    s.metadata.namespace = namespace.into();
    s.metadata.name = name.into();
    s.metadata.resource_version = 1;
    s.metadata
        .labels
        .insert(GATEWAY_TLS_LABEL.into(), "true".into());
    s.data.insert("tls.crt".into(), cert.pem());
    s.data.insert("tls.key".into(), key.serialize_pem());
    (Object::Secret(s), cert.der().to_vec())
}

fn routed(namespace: &str, host: &str, port: u16) -> ServiceView {
    ServiceView {
        namespace: namespace.into(),
        name: "hello".into(),
        cluster_ip: "10.96.0.1".into(),
        ports: vec![flotilla_api::ServicePort {
            port: 80,
            target_port: Some(port),
            protocol: flotilla_api::Protocol::Tcp,
            node_port: None,
            name: "http".into(),
        }],
        endpoints: vec!["127.0.0.1".into()],
        routes: vec![Route {
            host: host.into(),
            path: "/".into(),
            weight: 100,
        }],
    }
}

#[test]
fn names_cover_their_host_or_one_label_under_a_wildcard() {
    assert!(covers("hello.example", "hello.example"));
    assert!(covers("*.fn.example", "a.fn.example"));
    assert!(!covers("*.fn.example", "a.b.fn.example"));
    assert!(!covers("*.fn.example", "fn.example"));
    assert!(!covers("hello.example", "other.example"));
}

#[test]
fn a_certificate_answers_only_for_hosts_its_own_namespace_routes() {
    let inputs = Arc::new(InputStore::default());
    let (_tx, rx) = watch::channel(Arc::new(vec![routed("shop", "hello.example", 1)]));
    let certs = Certificates::new(rx, inputs.clone());
    // Another tenant's certificate for the same name: never used.
    let (theirs, _) = secret("evil", "steal", &["hello.example"]);
    inputs.put(theirs);
    assert!(certs.for_host("hello.example").is_none());
    // The shop's own, by name or wildcard, in any case.
    let (ours, _) = secret("shop", "tls", &["*.example"]);
    inputs.put(ours);
    assert!(certs.for_host("Hello.Example").is_some());
    // No route names the host: no certificate, whatever the Secrets say.
    assert!(certs.for_host("other.example").is_none());
    // A Secret that is not a certificate is passed over.
    let (Object::Secret(mut broken), _) = secret("shop", "broken", &["hello.example"]) else {
        unreachable!()
    };
    broken.data.insert("tls.key".into(), "not a key".into());
    inputs.retain(&HashSet::new());
    inputs.put(Object::Secret(broken));
    assert!(certs.for_host("hello.example").is_none());
}

/// A TLS client trusting `der`, naming `host`.
async fn connect(
    addr: std::net::SocketAddr,
    host: &str,
    der: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(der.to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
}

#[tokio::test]
async fn https_requests_are_served_with_the_certificate_for_their_host() {
    // The function's instance: a backend answering with what it got.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = backend.local_addr().unwrap().port();
    tokio::spawn(crate::net::gateway::accept(
        backend,
        std::future::pending(),
        |req| async move {
            let host = req.headers()["host"].to_str().unwrap().to_string();
            let body = format!("{} {host} {}", req.method(), req.uri().path());
            hyper::Response::new(Full::new(Bytes::from(body)))
        },
    ));
    let (_tx, rx) = watch::channel(Arc::new(vec![routed("shop", "hello.example", port)]));
    let inputs = Arc::new(InputStore::default());
    let (ours, der) = secret("shop", "tls", &["hello.example"]);
    inputs.put(ours);
    let gateway = Arc::new(Gateway::new(rx.clone()));
    let certs = Arc::new(Certificates::new(rx, inputs));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, gateway, server_config(certs)));

    let tls = connect(addr, "hello.example", &der).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/api/x")
        .header("host", "hello.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "GET hello.example /api/x");

    // A host no route names gets no certificate: the handshake fails.
    assert!(connect(addr, "other.example", &der).await.is_err());
}
