//! Edge bridge between the registers on a shelf and the controller (DESIGN.md §5).
//!
//! Not built yet: issue 3 ("Edge link") builds it on top of `protocol::kkt`.
