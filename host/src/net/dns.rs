//! A small DNS responder on the node bridge's address: answers A queries
//! for services (`NAME.NAMESPACE.svc` and `NAME.NAMESPACE`) from the
//! service table, NXDOMAIN for anything else. A bare `NAME` is found through
//! the pod's search list (`NAMESPACE.svc`, its own namespace), never in
//! another namespace — not even `default`. It never forwards: pods resolve
//! cluster names only.

use flotilla_api::proto::ServiceView;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::net::UdpSocket;
use tokio::sync::watch;

/// The search domain suffix of service names.
pub const DOMAIN: &str = "svc";

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const RCODE_FORMERR: u8 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;

/// The address `name` (lowercase, without the trailing dot) stands for.
pub fn resolve(services: &[ServiceView], name: &str) -> Option<Ipv4Addr> {
    let name = name.trim_end_matches('.');
    let name = name.strip_suffix(&format!(".{DOMAIN}")).unwrap_or(name);
    // No namespace named: nothing (the search list supplies the pod's own).
    let (svc, ns) = name.split_once('.')?;
    services
        .iter()
        .find(|s| s.name == svc && s.namespace == ns)
        .and_then(|s| s.cluster_ip.parse().ok())
}

/// Reads the question's name; returns it and the offset after it.
fn read_name(msg: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        // Questions do not use compression; refuse pointers and long names.
        if len > 63 || labels.len() > 127 {
            return None;
        }
        let label = msg.get(at..at + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += len;
    }
    Some((labels.join("."), at))
}

/// The reply to one query (`None`: not worth an answer, e.g. a response).
pub fn answer(services: &[ServiceView], query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    let opcode = (query[2] >> 3) & 0x0f;
    let reply = |rcode: u8, end: usize, answers: &[u8], ancount: u16| {
        let mut r = Vec::with_capacity(end + answers.len());
        r.extend_from_slice(&query[..2]);
        // QR, the query's opcode and RD; AA; RA off.
        r.push(0x80 | (query[2] & 0x79) | 0x04);
        r.push(rcode);
        r.extend_from_slice(&(if end > 12 { 1u16 } else { 0 }).to_be_bytes());
        r.extend_from_slice(&ancount.to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0]);
        r.extend_from_slice(&query[12..end]);
        r.extend_from_slice(answers);
        r
    };
    if opcode != 0 {
        return Some(reply(RCODE_NOTIMP, 12, &[], 0));
    }
    if qdcount != 1 {
        return Some(reply(RCODE_FORMERR, 12, &[], 0));
    }
    let Some((name, at)) = read_name(query, 12) else {
        return Some(reply(RCODE_FORMERR, 12, &[], 0));
    };
    let Some(q) = query.get(at..at + 4) else {
        return Some(reply(RCODE_FORMERR, 12, &[], 0));
    };
    let end = at + 4;
    let qtype = u16::from_be_bytes([q[0], q[1]]);
    let qclass = u16::from_be_bytes([q[2], q[3]]);
    let Some(ip) = resolve(services, &name) else {
        return Some(reply(RCODE_NXDOMAIN, end, &[], 0));
    };
    if qtype != TYPE_A || qclass != CLASS_IN {
        // The name exists, with no records of that type.
        return Some(reply(0, end, &[], 0));
    }
    let mut rr = Vec::with_capacity(16);
    rr.extend_from_slice(&[0xc0, 12]); // the question's name
    rr.extend_from_slice(&TYPE_A.to_be_bytes());
    rr.extend_from_slice(&CLASS_IN.to_be_bytes());
    rr.extend_from_slice(&5u32.to_be_bytes()); // TTL: endpoints move, VIPs do not; short anyway
    rr.extend_from_slice(&4u16.to_be_bytes());
    rr.extend_from_slice(&ip.octets());
    Some(reply(0, end, &rr, 1))
}

/// Serves DNS on `addr` (UDP) from the table until the task is aborted.
pub async fn serve(
    addr: SocketAddr,
    table: watch::Receiver<Arc<Vec<ServiceView>>>,
) -> std::io::Result<()> {
    let socket = UdpSocket::bind(addr).await?;
    let mut buf = vec![0u8; 1500];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let services = table.borrow().clone();
        if let Some(r) = answer(&services, &buf[..n]) {
            let _ = socket.send_to(&r, from).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<ServiceView> {
        vec![
            ServiceView {
                namespace: "default".into(),
                name: "web".into(),
                cluster_ip: "10.96.0.2".into(),
                ports: vec![],
                endpoints: vec![],
                routes: Vec::new(),
            },
            ServiceView {
                namespace: "prod".into(),
                name: "db".into(),
                cluster_ip: "10.96.0.3".into(),
                ports: vec![],
                endpoints: vec![],
                routes: Vec::new(),
            },
        ]
    }

    pub fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    #[test]
    fn names_resolve_in_three_forms_and_nothing_else() {
        let t = table();
        assert_eq!(
            resolve(&t, "web.default.svc"),
            Some(Ipv4Addr::new(10, 96, 0, 2))
        );
        assert_eq!(
            resolve(&t, "web.default.svc."),
            Some(Ipv4Addr::new(10, 96, 0, 2))
        );
        assert_eq!(
            resolve(&t, "web.default"),
            Some(Ipv4Addr::new(10, 96, 0, 2))
        );
        // Bare names (and `NAME.svc`, which a search list tries last) name
        // no namespace: a pod of another namespace must not reach default's.
        assert_eq!(resolve(&t, "web"), None);
        assert_eq!(resolve(&t, "web.svc"), None);
        assert_eq!(
            resolve(&t, "db.prod.svc"),
            Some(Ipv4Addr::new(10, 96, 0, 3))
        );
        assert_eq!(resolve(&t, "db"), None, "other namespaces need their name");
        assert_eq!(resolve(&t, "example.com"), None);
    }

    #[test]
    fn answers_a_queries_and_refuses_the_rest() {
        let t = table();
        let r = answer(&t, &query("WEB.default.svc", TYPE_A)).unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34], "same id");
        assert_eq!(r[2] & 0x80, 0x80, "a response");
        assert_eq!(r[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
        assert_eq!(&r[r.len() - 4..], &[10, 96, 0, 2]);
        let r = answer(&t, &query("nope.default.svc", TYPE_A)).unwrap();
        assert_eq!(r[3] & 0x0f, RCODE_NXDOMAIN);
        let r = answer(&t, &query("web.default.svc", 28)).unwrap();
        assert_eq!(
            (r[3] & 0x0f, u16::from_be_bytes([r[6], r[7]])),
            (0, 0),
            "AAAA: none"
        );
        // Garbage gets a format error or nothing, never a panic.
        assert_eq!(answer(&t, &[1, 2, 3]), None);
        let mut bad = query("web", TYPE_A);
        bad.truncate(15);
        assert_eq!(answer(&t, &bad).unwrap()[3] & 0x0f, RCODE_FORMERR);
        let mut response = query("web", TYPE_A);
        response[2] |= 0x80;
        assert_eq!(answer(&t, &response), None, "responses are not answered");
    }
}
