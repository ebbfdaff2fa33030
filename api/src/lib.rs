//! Flotilla's resource model, manifest parsing and validation, and the wire
//! protocol spoken between the scheduler and its host agents.
//!
//! This crate does no I/O beyond reading manifest-referenced files during
//! validation and the shared private-file writer in [`fs`]; everything else
//! is plain data.

pub mod autoscale;
pub mod config;
pub mod content;
pub mod fs;
pub mod function;
pub mod interfaces;
pub mod job;
pub mod latency;
pub mod manifest;
pub mod meta;
pub mod net;
pub mod object;
pub mod plugin;
pub mod probe;
pub mod prometheus;
pub mod proto;
pub mod quantity;
pub mod quota;
pub mod rollout;
pub mod seal;
pub mod selector;
pub mod time;

pub use meta::{Labels, ObjectMeta, OwnerRef};
pub use object::{
    AgentReport, Capacity, ContainerOptions, Deployment, DeploymentSpec, DeploymentStatus,
    Endpoint, Event, EventType, Kind, MemberSource, MemberSpec, MemberState, MemberStatus, Node,
    NodeStatus, Object, OnDisconnect, Pod, PodPhase, PodSpec, PodStatus, PodTemplate, Port,
    Protocol, RUNTIME_RUNC, RUNTIME_WASM, ReleasingAddress, Resources, RestartPolicy, Role, Secret,
    Service, ServicePort, ServiceSpec, ServiceStatus, Termination, TerminationReason, Token,
};
