//! Serves the API router over TCP, with TLS unless running in development
//! mode, attaching what the transport knows about each caller ([`Peer`]).

use crate::auth::identity_from_cert;
use crate::guard::Peer;
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let mut peer = Peer {
                ip: addr.ip(),
                cert: None,
                cert_serial: None,
            };
            match tls {
                None => serve_conn(tcp, peer, router).await,
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%addr, "TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => return,
                        };
                    let first = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first());
                    peer.cert = first.map(|c| identity_from_cert(c).map_err(|f| format!("{f:?}")));
                    peer.cert_serial = first.and_then(|c| crate::auth::cert_serial(c));
                    serve_conn(stream, peer, router).await;
                }
            }
        });
    }
}

async fn serve_conn<I>(io: I, peer: Peer, router: Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = router.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        req
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
    if let Err(e) = conn.await {
        tracing::debug!("API connection ended: {e}");
    }
}
