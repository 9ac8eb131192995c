//! Neural Collaborative Filtering (NeuMF = GMF + MLP): training on candle
//! ([`train`]), ONNX export ([`onnx`]) with a model card ([`card`]), serving
//! with tract and per-user fold-in ([`serve`], [`foldin`]), and the offline
//! evaluation ([`eval`]).

pub mod bench;
pub mod card;
pub mod data;
pub mod eval;
pub mod foldin;
pub mod history;
pub mod model;
pub mod onnx;
pub mod plot;
pub mod scoring;
pub mod sequence;
pub mod serve;
pub mod synthetic;
pub mod train;
