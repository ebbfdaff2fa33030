//! The Flotilla host agent: runs the pods the scheduler assigns to its node.

pub mod logs;
pub mod wasm;
