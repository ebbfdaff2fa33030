//! The wire protocol between the scheduler and its host agents.
//!
//! Frames travel on QUIC streams as `magic(2) version(1) length(4, big endian)`
//! followed by `length` bytes of JSON. Frames are capped in size; a peer that
//! sends anything else is disconnected. [`FrameDecoder`] is sans-IO: feed it
//! bytes, take frames out.

use crate::Labels;
use crate::object::{AgentReport, Capacity, PodSpec};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Version of the frame format and message set.
pub const PROTOCOL_VERSION: u8 = 3;
/// ALPN identifier of the agent link.
pub const ALPN: &[u8] = b"flotilla/1";
/// Two bytes that start every frame.
pub const MAGIC: [u8; 2] = *b"FL";
/// Header length: magic, version, length.
pub const HEADER_LEN: usize = 7;
/// Certificates are valid from this long before they are issued (clock skew);
/// renewal timing leaves it out of the lifetime.
pub const CERT_BACKDATE_SECS: i64 = 300;
/// Default upper bound on one frame's payload.
pub const MAX_FRAME_LEN: usize = 4 << 20;
/// Largest frame accepted from a peer not yet known (its first frame:
/// `Hello` or `Join`), so unauthenticated connections cannot make the
/// scheduler buffer megabytes each.
pub const FIRST_FRAME_LEN: usize = 64 << 10;
/// Most bytes of items one part of a cluster-wide table (`Sync`,
/// `Services`, `Peers`) carries. Tables larger than this go out in parts,
/// so no number of valid objects makes a frame exceed [`MAX_FRAME_LEN`]:
/// one item is bounded by the API's object caps, far below the frame cap.
pub const TABLE_PART_LEN: usize = 1 << 20;

/// Identity and resources an agent announces when it connects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub labels: Labels,
    pub allocatable: Capacity,
    pub arch: String,
    pub version: String,
    pub runtimes: Vec<String>,
    /// How the node networks pods: `bridge` (an address per pod), `loopback`
    /// or `host` (no addresses).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_network: String,
    /// The node serves HTTPS on its function gateway: it is sent the
    /// Secrets labelled [`crate::function::GATEWAY_TLS_LABEL`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway_tls: bool,
}

/// A pod the scheduler wants running on the agent's node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub spec: PodSpec,
    /// The node epoch under which the pod was assigned (fencing).
    pub epoch: u64,
    /// The pod's address (empty: the pod has no network).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_ip: String,
}

/// The one frame an agent sends on a stream of its own to fetch an
/// uploaded module. The scheduler answers on that stream with one status
/// byte: `0`, an 8-byte big-endian size and the bytes; or `1` and a UTF-8
/// reason. Only modules of pods bound to the asking node are served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRequest {
    pub digest: String,
}

/// The first frame of a stream an agent opens beside its control stream:
/// a module fetch or a member's key-value operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NodeRequest {
    Kv(crate::interfaces::KvRequest),
    Blob(BlobRequest),
}

/// Status byte of a blob reply: the bytes follow.
pub const BLOB_FOUND: u8 = 0;
/// Status byte of a blob reply: refused, a reason follows.
pub const BLOB_REFUSED: u8 = 1;

/// Messages from an agent to the scheduler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// First frame on an authenticated connection.
    Hello {
        version: u8,
        node: NodeInfo,
    },
    /// First (and only) frame of a connection without a client certificate:
    /// asks for one, proving the right with a join token.
    Join {
        version: u8,
        node_name: String,
        /// The secret part of the join token (`<id>.<secret>`).
        token: String,
        /// PKCS#10 request for the node's key (PEM).
        csr_pem: String,
    },
    /// A fresh certificate for the same node, before the current one expires.
    Renew {
        csr_pem: String,
    },
    Heartbeat {
        seq: u64,
    },
    /// The observed state of a pod changed (only the agent-owned fields).
    Report {
        uid: String,
        report: AgentReport,
    },
    /// A pod the node was told to stop is gone, its network with it: its
    /// address may be handed out again.
    Released {
        uid: String,
    },
    /// What the node and its running members use (sent at a low rate).
    Usage(UsageReport),
    /// A request reached the node's gateway for the function behind
    /// Service `namespace/service`, which has no ready instance: bring
    /// one up (scale from zero). Sent at most about once a second per
    /// service while requests wait.
    Wake {
        namespace: String,
        service: String,
    },
}

/// A sample of what a node and its running members use; rates come from
/// two samples in a row.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// When it was taken, by the node's clock (ms since the epoch).
    pub at_ms: u64,
    /// Busy CPU time of the whole machine since boot, in nanoseconds.
    pub node_cpu_ns: u64,
    /// Memory in use on the machine (total less available), in bytes.
    pub node_memory_bytes: u64,
    pub members: Vec<MemberUsage>,
}

/// One running member's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberUsage {
    pub pod_uid: String,
    pub member: String,
    /// CPU time of its current run, in nanoseconds.
    pub cpu_ns: u64,
    /// Linear memories (wasm) or the cgroup's working set (containers).
    pub memory_bytes: u64,
    /// A function's requests so far in this run, and those in flight.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub requests: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub in_flight: u64,
    /// Of those requests, the ones answered 5xx.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub errors: u64,
    /// The requests so far per latency bucket (time to the answer's head;
    /// [`crate::latency::BOUNDS_US`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency: Vec<u64>,
    /// The time its requests' instances lived so far, added up (µs).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub busy_us: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Messages from the scheduler to an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SchedulerMsg {
    /// Reply to `Hello`: the node is registered under `epoch`.
    Welcome {
        epoch: u64,
        heartbeat_ms: u64,
        /// The node's lease: renewed by each acknowledged heartbeat, it runs
        /// out this long after the heartbeat was sent. The scheduler moves
        /// no pod off the node before then (0: no lease, older schedulers).
        #[serde(default)]
        lease_ms: u64,
        /// The node's block of pod addresses (`10.88.3.0/24`; empty: none).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        pod_cidr: String,
        /// The cluster's pod CIDR: other nodes' pods are reached through
        /// the link (empty: no cross-node pod traffic).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        cluster_cidr: String,
    },
    /// Reply to `Hello` or `Join` when the agent cannot join; the connection closes after it.
    Refused {
        reason: String,
    },
    /// Reply to `Hello` from a scheduler that does not lead (several share
    /// one store): connect to the leader's QUIC address `to` instead (empty:
    /// no leader is known yet; try the next scheduler). The connection
    /// closes after it.
    Redirect {
        to: String,
    },
    /// Reply to `Join`: the node's client certificate, valid until `expires_ms`.
    Joined {
        cert_pem: String,
        expires_ms: u64,
    },
    /// Reply to `Renew`.
    Renewed {
        cert_pem: String,
        expires_ms: u64,
    },
    HeartbeatAck {
        seq: u64,
    },
    /// The full set of pods this node should run (sent after `Welcome`).
    /// Large sets come in parts: every part but the last has `more`.
    Sync {
        pods: Vec<Assignment>,
        #[serde(default, skip_serializing_if = "is_false")]
        more: bool,
    },
    /// Run one more pod.
    Assign(Assignment),
    /// Stop and forget a pod.
    Unassign {
        uid: String,
    },
    /// Every service and its ready endpoints (the whole table, sent after
    /// `Sync` and whenever it changes).
    /// In parts like `Sync`; one service's endpoints may span parts.
    Services {
        services: Vec<ServiceView>,
        #[serde(default, skip_serializing_if = "is_false")]
        more: bool,
    },
    /// A ConfigMap or Secret that pods sent to this node use (before the
    /// pods that need it, and again whenever it changes). The agent holds
    /// it while one of its pods refers to it.
    Input(Box<crate::Object>),
    /// Every bridged node's block of pod addresses and the address the
    /// scheduler sees it at (the whole table, on change), for direct routes.
    /// In parts like `Sync`.
    Peers {
        peers: Vec<Peer>,
        #[serde(default, skip_serializing_if = "is_false")]
        more: bool,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A node whose pods another node may route to directly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub node: String,
    /// `10.88.3.0/24`
    pub pod_cidr: String,
    /// The node's IP as the scheduler sees its link (behind NAT: the NAT's).
    pub address: String,
}

/// What a node's proxy and DNS responder need to know about a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: String,
    pub ports: Vec<crate::ServicePort>,
    /// Pod addresses of the ready endpoints.
    pub endpoints: Vec<String>,
    /// HTTP routes the node's function gateway sends here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<crate::function::Route>,
}

/// A request the scheduler sends on a fresh stream to read a member's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRequest {
    pub pod_uid: String,
    pub member: String,
    pub previous: bool,
    pub follow: bool,
    /// Only the last `tail_lines` lines of the existing log, if set.
    pub tail_lines: Option<u64>,
}

/// The agent's first reply on a log stream; raw log bytes follow when `Ok`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogReply {
    Ok,
    Err { message: String },
}

/// A request the scheduler sends on a fresh stream for `flotilla invoke`:
/// the node's gateway serves it as if it had come in over HTTP for the
/// Function's Service. The request body follows as raw bytes until the
/// scheduler finishes its side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvokeRequest {
    pub namespace: String,
    pub function: String,
    pub method: String,
    /// Path and query, starting with `/`.
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// The agent's replies on an invoke stream: `Accepted` (or `Err`) at once,
/// before it reads the body, so the scheduler can still try another node;
/// then `Head` (or `Err`), after which the response body follows as raw
/// bytes until the agent finishes its side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InvokeReply {
    Accepted,
    Head {
        status: u16,
        headers: Vec<(String, String)>,
    },
    Err {
        message: String,
    },
}

/// The first frame of a stream the scheduler opens to an agent. Untagged,
/// so a stream opened by a scheduler that knows only logs still reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StreamOpen {
    Log(LogRequest),
    Invoke(InvokeRequest),
}

/// Counts the bytes of a JSON encoding without keeping them.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Length of `item` encoded as JSON.
pub fn encoded_len<T: Serialize>(item: &T) -> usize {
    let mut n = ByteCount(0);
    serde_json::to_writer(&mut n, item).expect("protocol messages always serialize");
    n.0
}

/// Splits `items` into parts of at most `budget` encoded bytes each (an
/// item larger than the budget goes alone). Always at least one part.
pub fn parts<T: Serialize>(items: Vec<T>, budget: usize) -> Vec<Vec<T>> {
    let mut out = vec![Vec::new()];
    let mut used = 0;
    for item in items {
        let len = encoded_len(&item) + 1;
        if used + len > budget && !out.last().expect("never empty").is_empty() {
            out.push(Vec::new());
            used = 0;
        }
        used += len;
        out.last_mut().expect("never empty").push(item);
    }
    out
}

impl ServiceView {
    /// Splits a view whose endpoints alone would exceed `budget` bytes into
    /// views of the same service with a share of the endpoints each
    /// (receivers merge consecutive views of one service).
    pub fn split(mut self, budget: usize) -> Vec<ServiceView> {
        let base = encoded_len(&ServiceView {
            endpoints: Vec::new(),
            routes: Vec::new(),
            ..self.clone()
        });
        let endpoints = std::mem::take(&mut self.endpoints);
        if base + encoded_len(&endpoints) <= budget {
            self.endpoints = endpoints;
            return vec![self];
        }
        parts(endpoints, budget.saturating_sub(base).max(1))
            .into_iter()
            .map(|endpoints| ServiceView {
                endpoints,
                routes: Vec::new(),
                ..self.clone()
            })
            .collect()
    }
}

/// The `Sync`, `Services` or `Peers` messages that carry a whole table, in
/// parts of at most `budget` bytes of items.
pub fn table_messages(table: Table, budget: usize) -> Vec<SchedulerMsg> {
    fn mark<T>(
        parts: Vec<Vec<T>>,
        make: impl Fn(Vec<T>, bool) -> SchedulerMsg,
    ) -> Vec<SchedulerMsg> {
        let n = parts.len();
        parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| make(p, i + 1 < n))
            .collect()
    }
    match table {
        Table::Pods(pods) => mark(parts(pods, budget), |pods, more| SchedulerMsg::Sync {
            pods,
            more,
        }),
        Table::Services(services) => {
            let views = services.into_iter().flat_map(|v| v.split(budget)).collect();
            mark(parts(views, budget), |services, more| {
                SchedulerMsg::Services { services, more }
            })
        }
        Table::Peers(peers) => mark(parts(peers, budget), |peers, more| SchedulerMsg::Peers {
            peers,
            more,
        }),
    }
}

/// A cluster-wide table, whole.
#[derive(Clone, Debug, PartialEq)]
pub enum Table {
    Pods(Vec<Assignment>),
    Services(Vec<ServiceView>),
    Peers(Vec<Peer>),
}

/// Puts tables sent in parts back together on the receiving side.
#[derive(Debug, Default)]
pub struct Reassembly {
    pods: Vec<Assignment>,
    services: Vec<ServiceView>,
    peers: Vec<Peer>,
}

impl Reassembly {
    /// Takes one message: a table part is held until its last part, which
    /// comes back as the whole table's message; anything else comes back
    /// at once.
    pub fn add(&mut self, msg: SchedulerMsg) -> Option<SchedulerMsg> {
        match msg {
            SchedulerMsg::Sync { pods, more } => {
                self.pods.extend(pods);
                (!more).then(|| SchedulerMsg::Sync {
                    pods: std::mem::take(&mut self.pods),
                    more: false,
                })
            }
            SchedulerMsg::Services { services, more } => {
                for v in services {
                    match self.services.last_mut() {
                        Some(last) if last.namespace == v.namespace && last.name == v.name => {
                            last.endpoints.extend(v.endpoints)
                        }
                        _ => self.services.push(v),
                    }
                }
                (!more).then(|| SchedulerMsg::Services {
                    services: std::mem::take(&mut self.services),
                    more: false,
                })
            }
            SchedulerMsg::Peers { peers, more } => {
                self.peers.extend(peers);
                (!more).then(|| SchedulerMsg::Peers {
                    peers: std::mem::take(&mut self.peers),
                    more: false,
                })
            }
            other => Some(other),
        }
    }

    /// Forgets parts of an unfinished table (the connection ended).
    pub fn clear(&mut self) {
        *self = Reassembly::default();
    }
}

/// Everything that can go wrong reading a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("not a flotilla frame (bad magic {0:02x?}); is the peer speaking another protocol?")]
    BadMagic([u8; 2]),
    #[error("peer speaks protocol version {got}, this side speaks {ours}; upgrade the older side")]
    Version { got: u8, ours: u8 },
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame payload: {0}")]
    Payload(String),
}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = serde_json::to_vec(msg).expect("protocol messages always serialize");
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.push(PROTOCOL_VERSION);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Incremental frame decoder: push bytes in, pull messages out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            max,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Changes the largest frame accepted from here on.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// How many more bytes the next frame needs (at least one when nothing is buffered).
    pub fn wanted(&self) -> usize {
        if self.buf.len() < HEADER_LEN {
            return HEADER_LEN - self.buf.len();
        }
        let len = u32::from_be_bytes(self.buf[3..7].try_into().expect("4 bytes")) as usize;
        (HEADER_LEN + len).saturating_sub(self.buf.len()).max(1)
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    /// After an error the stream is unusable and must be closed.
    pub fn decode<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        if self.buf.len() >= 2 && self.buf[..2] != MAGIC {
            return Err(FrameError::BadMagic([self.buf[0], self.buf[1]]));
        }
        if self.buf.len() >= 3 && self.buf[2] != PROTOCOL_VERSION {
            return Err(FrameError::Version {
                got: self.buf[2],
                ours: PROTOCOL_VERSION,
            });
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[3..7].try_into().expect("4 bytes")) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let msg = serde_json::from_slice(&self.buf[HEADER_LEN..HEADER_LEN + len])
            .map_err(|e| FrameError::Payload(e.to_string()));
        self.buf.drain(..HEADER_LEN + len);
        msg.map(Some)
    }

    /// Bytes received after the last decoded frame (for streams that switch to raw data).
    pub fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// Reads framed messages from an async byte stream. Cancel-safe: bytes enter
/// the decoder only after a read has completed.
#[cfg(feature = "io")]
pub struct FrameReader<R> {
    inner: R,
    dec: FrameDecoder,
    buf: Vec<u8>,
}

/// Why reading a frame from a stream failed.
#[cfg(feature = "io")]
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("stream closed by peer")]
    Finished,
}

#[cfg(feature = "io")]
impl<R: tokio::io::AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            dec: FrameDecoder::default(),
            buf: vec![0; 16 * 1024],
        }
    }

    /// Like [`FrameReader::new`], accepting frames of at most `max` bytes.
    pub fn with_max(inner: R, max: usize) -> Self {
        let mut r = FrameReader::new(inner);
        r.dec.set_max(max);
        r
    }

    /// Changes the largest frame accepted from here on (e.g. once the peer
    /// is known).
    pub fn set_max(&mut self, max: usize) {
        self.dec.set_max(max);
    }

    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<T, ReadError> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(m) = self.dec.decode()? {
                return Ok(m);
            }
            match self.inner.read(&mut self.buf).await? {
                0 => return Err(ReadError::Finished),
                n => self.dec.push(&self.buf[..n]),
            }
        }
    }

    /// The stream and any bytes already read past the last frame.
    pub fn into_parts(mut self) -> (R, Vec<u8>) {
        let rest = self.dec.take_rest();
        (self.inner, rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_split_at_every_byte() {
        let msgs = vec![
            AgentMsg::Heartbeat { seq: 7 },
            AgentMsg::Report {
                uid: "u".into(),
                report: AgentReport::default(),
            },
        ];
        let wire: Vec<u8> = msgs.iter().flat_map(encode).collect();
        for split in 0..wire.len() {
            let mut d = FrameDecoder::default();
            let mut got = Vec::new();
            d.push(&wire[..split]);
            while let Some(m) = d.decode::<AgentMsg>().unwrap() {
                got.push(m);
            }
            d.push(&wire[split..]);
            while let Some(m) = d.decode::<AgentMsg>().unwrap() {
                got.push(m);
            }
            assert_eq!(got, msgs, "split at {split}");
        }
    }

    /// A log stream's first frame, as a scheduler that knows only logs
    /// sends it, still reads as a log request; an invoke reads as one.
    #[test]
    fn stream_openings_tell_logs_from_invokes() {
        let log = LogRequest {
            pod_uid: "u".into(),
            member: "m".into(),
            previous: false,
            follow: true,
            tail_lines: Some(5),
        };
        let mut d = FrameDecoder::default();
        d.push(&encode(&log));
        assert_eq!(
            d.decode::<StreamOpen>().unwrap(),
            Some(StreamOpen::Log(log))
        );
        let invoke = InvokeRequest {
            namespace: "default".into(),
            function: "hello".into(),
            method: "POST".into(),
            path: "/hi?x=1".into(),
            headers: vec![("content-type".into(), "text/plain".into())],
        };
        d.push(&encode(&StreamOpen::Invoke(invoke.clone())));
        assert_eq!(
            d.decode::<StreamOpen>().unwrap(),
            Some(StreamOpen::Invoke(invoke))
        );
    }

    #[test]
    fn refuses_hostile_frames() {
        let mut d = FrameDecoder::new(64);
        d.push(b"GET / HTTP/1.1\r\n");
        assert_eq!(d.decode::<AgentMsg>(), Err(FrameError::BadMagic(*b"GE")));

        let mut d = FrameDecoder::new(64);
        d.push(&[b'F', b'L', 9, 0, 0, 0, 1, b'{']);
        assert!(matches!(
            d.decode::<AgentMsg>(),
            Err(FrameError::Version { got: 9, .. })
        ));

        let mut d = FrameDecoder::new(64);
        d.push(&[b'F', b'L', PROTOCOL_VERSION, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.decode::<AgentMsg>(),
            Err(FrameError::TooLarge { .. })
        ));

        let mut d = FrameDecoder::new(64);
        d.push(&[b'F', b'L', PROTOCOL_VERSION, 0, 0, 0, 2, b'{', b'}']);
        assert!(matches!(
            d.decode::<AgentMsg>(),
            Err(FrameError::Payload(_))
        ));
    }

    fn assignment(i: usize, env_bytes: usize) -> Assignment {
        let mut spec = PodSpec::default();
        spec.members.push(crate::object::MemberSpec {
            name: "m".into(),
            args: vec!["x".repeat(env_bytes)],
            ..Default::default()
        });
        Assignment {
            uid: format!("uid-{i}"),
            namespace: "default".into(),
            name: format!("p{i}"),
            spec,
            epoch: 1,
            pod_ip: String::new(),
        }
    }

    fn through_the_wire(msgs: Vec<SchedulerMsg>) -> Vec<SchedulerMsg> {
        let mut whole = Vec::new();
        let mut r = Reassembly::default();
        for m in msgs {
            let wire = encode(&m);
            assert!(
                wire.len() <= MAX_FRAME_LEN,
                "a frame of {} bytes",
                wire.len()
            );
            let mut d = FrameDecoder::default();
            d.push(&wire);
            let back: SchedulerMsg = d.decode().unwrap().unwrap();
            whole.extend(r.add(back));
        }
        whole
    }

    #[test]
    fn tables_larger_than_a_frame_go_in_parts_and_come_back_whole() {
        // 10,000 pods of ~1 KiB: ~10 MiB, well over one frame.
        let pods: Vec<Assignment> = (0..10_000).map(|i| assignment(i, 1000)).collect();
        let msgs = table_messages(Table::Pods(pods.clone()), TABLE_PART_LEN);
        assert!(msgs.len() >= 10, "{} parts", msgs.len());
        let whole = through_the_wire(msgs);
        assert_eq!(whole, [SchedulerMsg::Sync { pods, more: false }]);

        // An empty table is one message (the agent learns it is empty).
        let msgs = table_messages(Table::Pods(Vec::new()), TABLE_PART_LEN);
        assert_eq!(
            msgs,
            [SchedulerMsg::Sync {
                pods: Vec::new(),
                more: false
            }]
        );

        // One service with 400,000 endpoints (~6 MiB) among small ones: its
        // endpoints span parts and are merged back, in order.
        let port = crate::ServicePort {
            name: String::new(),
            port: 80,
            target_port: Some(8080),
            protocol: Default::default(),
            node_port: None,
        };
        let view = |name: &str, n: u32| ServiceView {
            namespace: "default".into(),
            name: name.into(),
            cluster_ip: "10.96.0.1".into(),
            ports: vec![port.clone()],
            endpoints: (0..n)
                .map(|i| std::net::Ipv4Addr::from(0x0a58_0000 + i).to_string())
                .collect(),
            routes: Vec::new(),
        };
        let services = vec![view("a", 3), view("big", 400_000), view("c", 1)];
        let msgs = table_messages(Table::Services(services.clone()), TABLE_PART_LEN);
        assert!(msgs.len() >= 5, "{} parts", msgs.len());
        let whole = through_the_wire(msgs);
        assert_eq!(
            whole,
            [SchedulerMsg::Services {
                services,
                more: false
            }]
        );

        // A part left unfinished by a dropped connection is forgotten.
        let mut r = Reassembly::default();
        assert_eq!(
            r.add(SchedulerMsg::Peers {
                peers: vec![],
                more: true
            }),
            None
        );
        r.add(SchedulerMsg::Sync {
            pods: vec![assignment(1, 1)],
            more: true,
        });
        r.clear();
        assert_eq!(
            r.add(SchedulerMsg::Sync {
                pods: vec![],
                more: false
            }),
            Some(SchedulerMsg::Sync {
                pods: vec![],
                more: false
            })
        );
    }

    #[test]
    fn wanted_tracks_the_next_frame() {
        let wire = encode(&AgentMsg::Heartbeat { seq: 1 });
        let mut d = FrameDecoder::default();
        assert_eq!(d.wanted(), HEADER_LEN);
        d.push(&wire[..HEADER_LEN]);
        assert_eq!(d.wanted(), wire.len() - HEADER_LEN);
    }
}
