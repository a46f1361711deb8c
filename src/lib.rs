//! bearwatch: watches financial news for bursts of negative sentiment.
//!
//! Data flows one way: source → classify → window → detect → alert; see `docs/ARCHITECTURE.md`.

pub mod alert;
pub mod bench;
pub mod classify;
pub mod config;
pub mod detect;
pub mod error;
pub mod feedback;
pub mod files;
pub mod learn;
pub mod net;
pub mod telemetry;
pub mod news;
pub mod pipeline;
pub mod query_bounds;
pub mod rng;
pub mod server;
pub mod sql;
pub mod source;
pub mod storage;
pub mod sync;
pub mod window;
