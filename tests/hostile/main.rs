//! The hostile-network suite (issue 9, point 17): an attacker host that
//! holds **no key** sits on the same underlay as a small group, performs
//! each attack of the issue, and every test judges the outcome with the
//! issue's pass/fail bound. Needs root, like `tests/edge.rs`; skips loudly
//! without it and fails under `CI=1`.
//!
//! The group ([`common::group`]): core nodes CN1 `.10`, CN2 `.20`, CN3
//! `.30` and an edge node EN `.25` whose host drops UDP (`--role auto`, so
//! it becomes an EN by itself; primary CN2, backup CN1), plus a host `atk`
//! with no node and no key file. The attacker uses only what an outsider
//! has: the public wire format (README "Wire format"), addresses it can
//! see, and packets it captured on the underlay (with tcpdump in the
//! namespace of a host whose traffic it is assumed to see).
//!
//! Every packet stays inside the lab's namespaces, every flood is bounded
//! in time and count, and the lab's `Drop` tears everything down. The
//! tests take one global lock, so they run one at a time even under
//! `--test-threads=2`: several bounds compare rates measured seconds
//! apart, and a neighbour test's load in between would skew them.
//!
//! The tests, by point of the issue, in modules by what the attacker
//! does:
//!
//! - [`forgeries`]: forged headers (1,
//!   `forged_header_flood_does_not_stall_flows`, and
//!   `on_path_forgeries_do_not_starve_low_rate_flows`, which goes
//!   further: an attacker that sees the clear headers of a member's
//!   traffic);
//! - [`replays`]: packets captured on the underlay and sent again: a
//!   replayed `Attach` (2, `replayed_attach_changes_nothing`), replays
//!   through a relay (4, `relayed_replays_are_dropped`) and reflection off
//!   the join (5, `no_reflection_amplification`);
//! - [`resources`]: attacks on a node's memory, descriptors, queues and
//!   control thread: idle TCP connections with and without a 1024
//!   descriptor limit (3, `idle_tcp_connections_are_cheap`,
//!   `idle_tcp_connections_under_ulimit_1024`), stalled edge nodes (9,
//!   `stalled_edge_node_leaves_others_untouched`) and a flood on the
//!   control port (found by review,
//!   `control_port_flood_leaves_timers_running`);
//! - [`mtu`]: an underlay MTU of 1400 (13,
//!   `bulk_tcp_through_mtu_1400_path`);
//! - [`tools`]: the attacker's wire-format tools and their check without a
//!   lab (`attacker_tools_self_check`).
//!
//! [`common`] holds what several of them share: the lock, the group, pings
//! and bulk TCP.
//!
//! `cargo test --release --test hostile -- --nocapture` prints each
//! test's figures.

mod common;
mod edge_legs;
mod forgeries;
mod ipv6;
mod lan;
mod mtu;
mod replays;
mod resources;
mod tools;
