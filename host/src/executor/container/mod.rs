//! Container members: an unpacked image run by `runc` under the shim. A
//! container outlives the agent: a restarted agent recovers it.

pub mod runc;
pub mod runtime;
pub mod shim;
pub mod sys;
pub mod userns;

use super::{BoxFuture, Prepared, Recovered, Run, RunCx};
use crate::executor::container::runtime::{self as container, ContainerRuntime, Found, StartSpec};
use crate::executor::wasm::runtime::Exit;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A container member ready to run.
pub struct ContainerMember {
    pub rt: Arc<ContainerRuntime>,
    pub prepared: Arc<container::Prepared>,
    /// The pod's network namespace and resolv.conf, set once the sandbox
    /// exists.
    pub net: std::sync::OnceLock<(Option<PathBuf>, Option<String>)>,
    /// The pod's user namespace mapping, for pods that run in one.
    pub userns: std::sync::OnceLock<sys::IdMap>,
}

impl ContainerMember {
    pub fn new(rt: Arc<ContainerRuntime>, prepared: Arc<container::Prepared>) -> ContainerMember {
        ContainerMember {
            rt,
            prepared,
            net: std::sync::OnceLock::new(),
            userns: std::sync::OnceLock::new(),
        }
    }
}

struct ContainerRun {
    rt: Arc<ContainerRuntime>,
    running: container::Running,
}

impl Prepared for ContainerMember {
    fn runtime(&self) -> &'static str {
        flotilla_api::RUNTIME_RUNC
    }

    fn scratch(&self, pod_uid: &str, member: &str) -> Option<(PathBuf, u64)> {
        Some((
            self.rt.upper_dir(&ContainerRuntime::id(pod_uid, member)),
            self.rt.scratch_limit(),
        ))
    }

    fn exec<'a>(
        &'a self,
        pod_uid: &'a str,
        member: &'a str,
        cmd: &'a [String],
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.rt
                .exec(&ContainerRuntime::id(pod_uid, member), cmd)
                .await
        })
    }

    fn recover<'a>(&'a self, pod_uid: &'a str, member: &'a str) -> BoxFuture<'a, Recovered> {
        Box::pin(async move {
            match self.rt.find(pod_uid, member) {
                Found::Running(r) => {
                    tracing::info!(pod = %pod_uid, %member, pid = r.pid, "re-adopted running container");
                    let restarts = r.restarts;
                    Recovered::Running {
                        run: Box::new(ContainerRun {
                            rt: self.rt.clone(),
                            running: *r,
                        }),
                        restarts,
                    }
                }
                Found::Exited { exit, restarts } => {
                    self.rt.remove(&ContainerRuntime::id(pod_uid, member)).await;
                    Recovered::Exited { exit, restarts }
                }
                Found::Nothing => Recovered::Nothing,
            }
        })
    }

    fn start<'a>(&'a self, cx: RunCx<'a>) -> BoxFuture<'a, Result<Box<dyn Run>, Exit>> {
        Box::pin(async move {
            let (netns, resolv) = match self.net.get() {
                Some((n, r)) => (n.as_deref(), r.as_deref()),
                None => (None, None),
            };
            let spec = StartSpec {
                pod_uid: cx.pod_uid,
                pod_name: cx.pod_name,
                member: cx.member,
                log_dir: cx.log_dir,
                env: cx.env,
                mounts: cx.mounts,
                restarts: cx.restarts,
                netns,
                resolv_conf: resolv,
                userns: self.userns.get().copied(),
            };
            // A start is not cancelled half-way (the shim could be left
            // running with nobody to clean up after it): the supervisor
            // awaits it whole and honours a stop right after.
            let running = self.rt.start(&self.prepared, &spec).await?;
            Ok(Box::new(ContainerRun {
                rt: self.rt.clone(),
                running,
            }) as Box<dyn Run>)
        })
    }
}

impl Run for ContainerRun {
    fn started_ms(&self) -> u64 {
        self.running.started_ms
    }

    fn meter(&self) -> Option<crate::metrics::Meter> {
        Some(crate::metrics::Meter::Cgroup(format!(
            "flotilla/{}",
            self.running.id
        )))
    }

    fn wait(&mut self) -> BoxFuture<'_, Exit> {
        Box::pin(self.running.wait())
    }

    fn stop(mut self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            self.running.stop(grace).await;
            self.rt.remove(&self.running.id).await;
        })
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            self.rt.remove(&self.running.id).await;
        })
    }
}
