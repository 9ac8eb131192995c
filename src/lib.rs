//! recstream: a Kafka-native, real-time movie recommendation engine.
//!
//! The flow reads top to bottom in [`pipeline`]: interactions are decoded
//! ([`event`]), applied to per-user state ([`state`], persisted by [`store`] in
//! RocksDB) with event-time decay ([`decay`]), candidates are generated and
//! blended ([`recommend`], [`blend`]) and the outputs ([`output`]) are published
//! back to Kafka. [`engine`] is the synchronous core shared by the Kafka path
//! and in-process callers.

pub mod allocator;
pub mod api;
pub mod archive;
pub mod blend;
pub mod catalog;
pub mod changelog;
pub mod cli;
pub mod config;
pub mod cowatch;
pub mod decay;
pub mod demo;
pub mod engine;
pub mod event;
pub mod experiment;
pub mod feedback;
pub mod fnv;
pub mod global;
pub mod handover;
pub mod http;
pub mod live;
pub mod loadgen;
pub mod metrics;
pub mod ncf;
pub mod openapi;
pub mod output;
pub mod pipeline;
pub mod ranker;
pub mod ratings;
pub mod recommend;
pub mod replay;
pub mod rng;
pub mod routing;
pub mod state;
pub mod state_size;
pub mod store;
pub mod topics;
