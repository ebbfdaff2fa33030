//! Members' `wasi:keyvalue` operations, sent to the scheduler, which keeps
//! the buckets: one stream of the node's QUIC link per operation (opening
//! a stream costs no round trip), a [`KvRequest`] frame out and a
//! [`KvReply`] frame back. Buckets live with the scheduler so a pod's
//! state is the same on whatever node it runs next and survives the node;
//! while the node has no link, operations fail (after [`LINK_WAIT`]) with
//! an error the guest sees, rather than hanging.

use crate::executor::BoxFuture;
use crate::executor::wasm::interfaces::KvClient;
use flotilla_api::interfaces::{KvError, KvReply, KvRequest};
use flotilla_api::proto::{FrameReader, encode};
use std::time::Duration;
use tokio::sync::watch;

/// How long an operation waits for a link when there is none.
pub const LINK_WAIT: Duration = Duration::from_secs(5);
/// How long an operation may take on the link.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends operations over the node's current link.
pub struct LinkKv {
    link: watch::Receiver<Option<quinn::Connection>>,
}

impl LinkKv {
    pub fn new(link: watch::Receiver<Option<quinn::Connection>>) -> LinkKv {
        LinkKv { link }
    }
}

impl KvClient for LinkKv {
    fn call(&self, req: KvRequest) -> BoxFuture<'static, KvReply> {
        let mut link = self.link.clone();
        Box::pin(async move {
            let waited = tokio::time::timeout(LINK_WAIT, super::fetch::live_link(&mut link)).await;
            let conn = match waited {
                Ok(Some(c)) => c,
                _ => {
                    return Err(KvError::Unavailable(
                        "the scheduler, which keeps key-value buckets, is unreachable from this node"
                            .into(),
                    ));
                }
            };
            match tokio::time::timeout(CALL_TIMEOUT, call(&conn, &req)).await {
                Ok(r) => r,
                Err(_) => Err(KvError::Unavailable(format!(
                    "the scheduler did not answer within {CALL_TIMEOUT:?}"
                ))),
            }
        })
    }
}

async fn call(conn: &quinn::Connection, req: &KvRequest) -> KvReply {
    let lost = |e: &dyn std::fmt::Display| {
        KvError::Unavailable(format!("the link to the scheduler failed: {e}"))
    };
    let (mut send, recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    send.write_all(&encode(req)).await.map_err(|e| lost(&e))?;
    let _ = send.finish();
    FrameReader::new(recv)
        .next::<KvReply>()
        .await
        .map_err(|e| lost(&e))?
}
