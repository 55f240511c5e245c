//! REST API, durable store, balancer and automation (DESIGN.md §4).
//!
//! Not built yet: issue 4 builds it after the edge link (issue 3).
