//! Wire types shared by every part of the cloud balancer. No I/O here: everything is a value that
//! can be built, checked, encoded and decoded in a unit test.
//!
//! * [`receipt`] — the receipt model (kopecks and thousandths, never floats) and its validation;
//! * [`tlv`] and [`document`] — FFD TLV and the fiscal documents built from it;
//! * [`container`] — the KKT ↔ OFD session header and container with its CRC;
//! * [`checksum`] — INN and RNM algorithms;
//! * [`kkt`] — the JSON link between a register and its agent;
//! * [`ferma`] — the Ferma-compatible REST contract: request parsers and answer shapes.

pub mod checksum;
pub mod container;
pub mod document;
pub mod ferma;
pub mod kkt;
pub mod receipt;
pub mod tlv;
pub mod tunnel;
mod wire;
