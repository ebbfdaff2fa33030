//! Assembles a running scheduler: store, CA, QUIC endpoint, controllers, API.

use crate::cluster::{Cluster, ClusterConfig};
use crate::pki::{CertPair, ClusterCa, PkiError};
use crate::store::{EtcdConfig, EtcdStore, RedbStore, Store, StoreError};
use crate::tls::{TlsError, server_config};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub data_dir: PathBuf,
    pub api_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    pub node_timeout: Duration,
    pub heartbeat: Duration,
    /// Serve the API over plain HTTP (development only; loopback only).
    pub insecure_http: bool,
    /// Lifetime of node certificates (agents renew at two thirds of it).
    pub node_cert_ttl: Duration,
    /// The cluster's pod addresses (one /24 per node).
    pub pod_cidr: crate::ipam::Cidr,
    /// How long an uploaded module nothing references is kept.
    pub blob_grace: Duration,
    /// Be the site's artifact cache: nodes get registry artifacts and images
    /// through this scheduler (see [`crate::mirror`]).
    pub pull_through: bool,
    /// The node ports services may ask for (`--node-port-range`).
    pub node_ports: flotilla_api::net::PortRange,
    /// Registry credentials, plain-HTTP and loopback registries
    /// (`--registry-config`).
    pub registries: flotilla_registry::config::RegistryConfig,
    /// Where the objects live (`--store`).
    pub store: StoreBackend,
    /// The address other schedulers, agents and clients reach this one at
    /// (`--advertise`), when it listens on an unspecified one; several
    /// schedulers on one etcd store tell each other's clients where the
    /// leader is.
    pub advertise: Option<std::net::IpAddr>,
}

/// The store a scheduler keeps its objects in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StoreBackend {
    /// `store.redb` in the data dir (the default: one scheduler, small sites).
    #[default]
    Redb,
    /// An etcd cluster (`--store etcd://…`).
    Etcd(EtcdConfig),
}

/// Default for [`SchedulerConfig::blob_grace`].
pub const DEFAULT_BLOB_GRACE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the store at {path}: {source} (is another flotilla using this data dir?)")]
    Store { path: PathBuf, source: StoreError },
    #[error("cannot use the etcd store at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        source: StoreError,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("plain HTTP is allowed on loopback only, not on {0}; drop --insecure-http")]
    InsecureNotLoopback(SocketAddr),
    #[error(
        "several schedulers may share an etcd store, so each must say where it is reached: listening on {0}, it needs --advertise IP"
    )]
    NoAdvertise(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running scheduler.
pub struct Scheduler {
    pub api_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    pub cluster: Arc<Cluster>,
    ca: Arc<ClusterCa>,
    shutdown: watch::Sender<bool>,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
}

pub async fn start(cfg: SchedulerConfig) -> Result<Scheduler, StartError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| StartError::Store {
        path: cfg.data_dir.clone(),
        source: StoreError::Backend(e.to_string()),
    })?;
    let store_path = cfg.data_dir.join("store.redb");
    let key_path = cfg.data_dir.join("secrets.key");
    let sealer = Arc::new(
        flotilla_api::seal::Sealer::load_or_create(&key_path).map_err(|e| StartError::Store {
            path: key_path.clone(),
            source: StoreError::Backend(e.to_string()),
        })?,
    );
    let mut etcd_store: Option<Arc<EtcdStore>> = None;
    let store: Arc<dyn Store> = match &cfg.store {
        StoreBackend::Redb => Arc::new(
            RedbStore::open_sealed(&store_path, Some(sealer.clone())).map_err(|source| {
                StartError::Store {
                    path: store_path.clone(),
                    source,
                }
            })?,
        ),
        StoreBackend::Etcd(etcd) => {
            let connect = {
                let (etcd, sealer) = (etcd.clone(), sealer.clone());
                move || EtcdStore::connect(&etcd, Some(sealer))
            };
            // Connecting blocks (on the store's own runtime).
            let store = tokio::task::spawn_blocking(connect)
                .await
                .map_err(|e| StartError::Etcd {
                    endpoints: etcd.endpoints.join(","),
                    source: StoreError::Backend(e.to_string()),
                })?
                .map_err(|source| StartError::Etcd {
                    endpoints: etcd.endpoints.join(","),
                    source,
                })?;
            tracing::info!(endpoints = %etcd.endpoints.join(","), prefix = %etcd.prefix, "store on etcd");
            let store = Arc::new(store);
            etcd_store = Some(store.clone());
            store
        }
    };
    let ca = Arc::new(ClusterCa::load_or_create(&cfg.data_dir.join("pki"))?);
    if let (Some(etcd), StoreBackend::Etcd(c)) = (&etcd_store, &cfg.store) {
        let (etcd, pem) = (etcd.clone(), ca.cert_pem().to_string());
        tokio::task::spawn_blocking(move || etcd.check_identity(&pem))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))
            .and_then(|r| r)
            .map_err(|source| StartError::Etcd {
                endpoints: c.endpoints.join(","),
                source,
            })?;
    }
    let server_cert = ca.issue_server(&[cfg.quic_addr.ip().to_string()])?;
    let endpoint = crate::tls::endpoint(
        cfg.quic_addr,
        Some(server_config(ca.cert_pem(), &server_cert)?),
    )
    .map_err(|source| StartError::Listen {
        addr: cfg.quic_addr,
        source,
    })?;
    let quic_addr = endpoint.local_addr().map_err(|source| StartError::Listen {
        addr: cfg.quic_addr,
        source,
    })?;
    let listener = tokio::net::TcpListener::bind(cfg.api_addr)
        .await
        .map_err(|source| StartError::Listen {
            addr: cfg.api_addr,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: cfg.api_addr,
        source,
    })?;

    let blobs_dir = cfg.data_dir.join("blobs");
    let blobs =
        flotilla_api::content::ContentStore::open(&blobs_dir).map_err(|e| StartError::Store {
            path: blobs_dir.clone(),
            source: StoreError::Backend(e.to_string()),
        })?;
    let cluster = Cluster::new(
        store,
        blobs,
        ClusterConfig {
            data_dir: cfg.data_dir.clone(),
            node_timeout: cfg.node_timeout,
            heartbeat: cfg.heartbeat,
            node_cert_ttl: cfg.node_cert_ttl,
            pod_cidr: cfg.pod_cidr,
            blob_grace: cfg.blob_grace,
            pull_through: cfg.pull_through,
            node_ports: cfg.node_ports,
            registries: Arc::new(cfg.registries.clone()),
        },
        Some(ca.clone()),
    );
    let _ = cluster.sealer.set(sealer);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut replicas = None;
    if let Some(etcd) = &etcd_store {
        // One of possibly several: lead only once elected.
        let scheme = if cfg.insecure_http { "http" } else { "https" };
        let reach = |a: SocketAddr| match (a.ip().is_unspecified(), cfg.advertise) {
            (false, _) => Ok(a),
            (true, Some(ip)) => Ok(SocketAddr::new(ip, a.port())),
            (true, None) => Err(StartError::NoAdvertise(a)),
        };
        let (api, quic) = (reach(api_addr)?, reach(quic_addr)?);
        let me = crate::leader::Candidate {
            id: format!("{}-{}", api, std::process::id()),
            api: format!("{scheme}://{api}"),
            quic: quic.to_string(),
        };
        cluster
            .leadership
            .set(crate::leader::Role::Follower { leader: None });
        etcd.campaign(me, cluster.leadership.clone(), shutdown_rx.clone());
        // Followers keep a copy of every referenced module, as the leader's
        // peer (a certificate of its own, recorded like any other).
        let ttl = Duration::from_secs(365 * 24 * 3600);
        let pair = ca.issue_user("scheduler", flotilla_api::Role::Admin, &[], ttl)?;
        let (store, pem) = (cluster.store.clone(), pair.cert_pem.clone());
        let recorded = tokio::task::spawn_blocking(move || {
            crate::auth::record_certificate(
                store.as_ref(),
                &pem,
                "scheduler",
                flotilla_api::Role::Admin,
                &[],
                ttl,
                "scheduler",
            )
        })
        .await;
        let record_error = |e: String| StartError::Pki(PkiError::Record(e));
        recorded
            .map_err(|e| record_error(e.to_string()))?
            .map_err(|e| record_error(e.to_string()))?;
        match crate::replicate::PeerClient::new(ca.cert_pem(), &pair.cert_pem, &pair.key_pem) {
            Ok(client) => {
                replicas = Some(tokio::spawn(crate::replicate::replicate_loop(
                    cluster.clone(),
                    client,
                )));
            }
            Err(e) => tracing::error!("modules will not be copied from the leader: {e}"),
        }
    }
    let mut tasks = vec![
        tokio::spawn(crate::agents::dispatch(cluster.clone())),
        tokio::spawn(crate::agents::write_statuses(cluster.clone())),
        tokio::spawn(crate::blobs::collect_loop(
            cluster.clone(),
            Duration::from_secs(60).min(cfg.blob_grace.max(Duration::from_secs(1))),
        )),
        tokio::spawn(crate::agents::serve(endpoint.clone(), cluster.clone())),
        tokio::spawn(crate::controllers::run(
            cluster.clone(),
            shutdown_rx.clone(),
        )),
        tokio::spawn(close_sessions_on_step_down(cluster.clone())),
    ];
    tasks.extend(replicas);
    let router = crate::api::router(cluster.clone());
    let tls = if cfg.insecure_http {
        if !api_addr.ip().is_loopback() {
            return Err(StartError::InsecureNotLoopback(api_addr));
        }
        tracing::warn!("API on plain HTTP (development mode): credentials travel unencrypted");
        None
    } else {
        let mut names = vec![api_addr.ip().to_string()];
        if api_addr.ip().is_unspecified() {
            names.push("127.0.0.1".into());
        }
        let api_cert = ca.issue_server(&names)?;
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            crate::tls::api_server_config(ca.cert_pem(), &api_cert)?,
        )))
    };
    tasks.push(tokio::spawn(crate::http::serve(
        listener,
        tls,
        router,
        shutdown_rx.clone(),
    )));
    tracing::info!(%api_addr, %quic_addr, data_dir = %cfg.data_dir.display(), "scheduler started");
    Ok(Scheduler {
        api_addr,
        quic_addr,
        cluster,
        ca,
        shutdown,
        endpoint,
        tasks,
    })
}

impl Scheduler {
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// Issues a user's client certificate (e.g. the admin config `up`
    /// writes) and records it, revocable like any other.
    pub fn issue_user_cert(
        &self,
        name: &str,
        role: flotilla_api::Role,
        namespaces: &[String],
        ttl: Duration,
    ) -> Result<CertPair, PkiError> {
        let pair = self.ca.issue_user(name, role, namespaces, ttl)?;
        crate::auth::record_certificate(
            self.cluster.store.as_ref(),
            &pair.cert_pem,
            name,
            role,
            namespaces,
            ttl,
            "scheduler",
        )
        .map_err(|e| PkiError::Record(e.to_string()))?;
        Ok(pair)
    }

    /// Issues a client certificate for an agent on this machine (all-in-one).
    /// A certificate for node `node`, registering the name (the
    /// all-in-one cluster's own agent, tests).
    pub fn issue_agent_cert(&self, node: &str) -> Result<CertPair, PkiError> {
        if let Err(e) = self.cluster.admit_node(node) {
            tracing::warn!(%node, "cannot register the node: {e}");
        }
        self.ca.issue_agent(node)
    }

    /// Stops serving and makes every write durable; a leader hands over
    /// (revokes its lease) so another takes over at once.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let mut role = self.cluster.leadership.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            role.wait_for(|r| !matches!(r, crate::leader::Role::Leader { term } if *term > 0)),
        )
        .await;
        self.endpoint.close(0u32.into(), b"scheduler shutting down");
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        if let Err(e) = self.cluster.store.flush() {
            tracing::error!("final store flush failed: {e}");
        }
    }
}

/// Ends the agents' links whenever this scheduler stops leading: they go
/// to the new leader.
async fn close_sessions_on_step_down(cluster: Arc<Cluster>) {
    let mut role = cluster.leadership.subscribe();
    while role.changed().await.is_ok() {
        if !cluster.leadership.is_leader() {
            crate::agents::close_sessions(&cluster, "this scheduler no longer leads");
        }
    }
}
