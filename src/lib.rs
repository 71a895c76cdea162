//! The `ela-fast` node: CLI, wiring of the control thread and the
//! per-core dataplane, the local status socket, and the network-namespace
//! lab used by the demo and the integration tests.

pub mod bench;
pub mod cli;
pub mod control_codec;
pub mod credentials;
pub mod demo;
pub mod identity;
pub mod join;
pub mod netns;
pub mod node;
pub mod pending;
pub mod status;
