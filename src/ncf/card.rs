//! The model card: a JSON file beside the ONNX model that says how to feed it
//! (input/output names and shapes), which ids its rows mean, how it was
//! trained and how well it did.
//!
//! Files of one model `NAME`: `NAME.onnx`, `NAME.card.json` and
//! `NAME.users.f32` (the trained user vectors, little-endian float32,
//! row-major `[users.len()][user_vector.dim]`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::model::{NcfWeights, Objective};

pub const CARD_FORMAT: &str = "recstream-ncf/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    /// `"N"` is the symbolic batch dimension.
    pub shape: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserVectorLayout {
    pub dim: usize,
    /// Half-open ranges of the GMF and MLP parts, and the bias position.
    pub gmf: [usize; 2],
    pub mlp: [usize; 2],
    pub bias: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub format: String,
    pub model_version: String,
    pub objective: Objective,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub user_vector: UserVectorLayout,
    /// Catalog movie id of each item index.
    pub item_ids: Vec<u32>,
    /// External user id of each row of the user-vector file.
    pub user_ids: Vec<String>,
    /// Explicit models: the rating scale, used to normalise scores for the blend.
    pub rating_scale: Option<[f32; 2]>,
    /// The architecture and training settings.
    pub training: serde_json::Value,
    /// FNV-1a 64 of the training interactions (user, movie, rating, time).
    pub training_data_hash: String,
    pub training_data: String,
    /// Validation/test metrics by name.
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// Reference scores from the framework that trained the model: the engine
    /// refuses a model whose tract output differs from any of them by more
    /// than [`PARITY_TOLERANCE`] (a broken export, or files of two models).
    #[serde(default)]
    pub checks: Vec<ParityCheck>,
    /// The vector users the model never saw start from (and are pulled
    /// towards by fold-in), `user_vector.dim` values. Absent: the mean of the
    /// trained user vectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_user_prior: Option<Vec<f32>>,
    /// History-based models: how the graph reads the user's history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistorySpec>,
}

/// The history inputs of a history-based model (`models/README.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistorySpec {
    /// `L`: the width of the `history` and `history_kind` inputs.
    pub max_len: usize,
    /// What each `history_kind` value means (index = kind; 0 is padding).
    pub kinds: Vec<String>,
}

/// Largest accepted difference between a card's reference score and tract's.
pub const PARITY_TOLERANCE: f32 = 1e-4;

/// One reference score: the user-vector file's row `user_row` against item
/// index `item`, as the training framework computed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParityCheck {
    pub user_row: usize,
    pub item: u32,
    pub score: f32,
    /// History-based models: the history fed with the check, most recent
    /// first, as `(item index, kind)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<(u32, u8)>>,
}

impl ParityCheck {
    /// `n` pairs spread over users and items, the same for every export of a
    /// model's shape.
    pub fn pairs(n_users: usize, n_items: usize, n: usize) -> Vec<(usize, u32)> {
        if n_users == 0 || n_items == 0 {
            return Vec::new();
        }
        (0..n)
            .map(|k| {
                let user = k * n_users / n;
                let item = (k * 7919 + 13) % n_items;
                (user, item as u32)
            })
            .collect()
    }
}

/// The three files of a model, from the path of any of them or of its stem.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFiles {
    pub onnx: PathBuf,
    pub card: PathBuf,
    pub users: PathBuf,
}

impl ModelFiles {
    pub fn new(path: &Path) -> ModelFiles {
        let s = path.to_string_lossy();
        let stem = s
            .strip_suffix(".onnx")
            .or_else(|| s.strip_suffix(".card.json"))
            .or_else(|| s.strip_suffix(".users.f32"))
            .unwrap_or(&s)
            .to_string();
        ModelFiles {
            onnx: PathBuf::from(format!("{stem}.onnx")),
            card: PathBuf::from(format!("{stem}.card.json")),
            users: PathBuf::from(format!("{stem}.users.f32")),
        }
    }
}

impl UserVectorLayout {
    /// The layout of `weights`' user vector: `[gmf | mlp | bias]`.
    pub fn of(weights: &NcfWeights) -> UserVectorLayout {
        let (g, m) = (weights.gmf_dim, weights.mlp_dim);
        UserVectorLayout {
            dim: weights.user_dim(),
            gmf: [0, g],
            mlp: [g, g + m],
            bias: g + m,
        }
    }
}

impl ModelCard {
    /// A history model's inputs: the contract's, with `history` and
    /// `history_kind` int64 `[N, max_len]` before `item`.
    pub fn history_io_specs(user_dim: usize, max_len: usize) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
        let (mut inputs, outputs) = ModelCard::io_specs(user_dim);
        for name in ["history", "history_kind"] {
            inputs.insert(
                inputs.len() - 1,
                TensorSpec {
                    name: name.into(),
                    dtype: "int64".into(),
                    shape: vec!["N".into(), max_len.into()],
                },
            );
        }
        (inputs, outputs)
    }

    pub fn io_specs(user_dim: usize) -> (Vec<TensorSpec>, Vec<TensorSpec>) {
        let n = serde_json::Value::from("N");
        (
            vec![
                TensorSpec {
                    name: "user".into(),
                    dtype: "float32".into(),
                    shape: vec![n.clone(), user_dim.into()],
                },
                TensorSpec {
                    name: "item".into(),
                    dtype: "int64".into(),
                    shape: vec![n.clone()],
                },
            ],
            vec![TensorSpec {
                name: "score".into(),
                dtype: "float32".into(),
                shape: vec![n],
            }],
        )
    }
}
