//! Edge bridge between the registers on a shelf and the controller (DESIGN.md §5).

pub mod agent;
pub mod executor;
pub mod health;
pub mod identity;
pub mod journal;
pub mod kkt_link;
pub mod run;
pub mod store;
pub mod uplink;
