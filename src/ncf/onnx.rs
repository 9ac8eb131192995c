//! ONNX export of [`NcfWeights`] and the way back (for fold-in of a loaded
//! model). The graph is written with the protobuf types tract itself parses.
//!
//! Contract (see `models/README.md`): inputs `user` float32 `[N, D]` and `item`
//! int64 `[N]`, output `score` float32 `[N]`; `N` is symbolic.

use std::collections::HashMap;

use prost::Message;
use tract_onnx::pb;

use super::history::{HistoryEncoder, HISTORY_KINDS};
use super::model::{Dense, NcfWeights, Objective};

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("cannot decode the ONNX model: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("ONNX model does not follow the NeuMF contract: {0}")]
    Contract(String),
}

const OPSET: i64 = 13;
const META_PREFIX: &str = "recstream.";

fn float_tensor(name: &str, dims: &[usize], data: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn int_tensor(name: &str, data: &[i64]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: vec![data.len() as i64],
        data_type: pb::tensor_proto::DataType::Int64 as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn node(
    op: &str,
    inputs: &[&str],
    output: &str,
    attributes: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: attributes,
        ..Default::default()
    }
}

fn int_attribute(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn value_info(
    name: &str,
    elem: pb::tensor_proto::DataType,
    dims: &[Result<i64, &str>],
) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::dimension::Value;
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| pb::tensor_shape_proto::Dimension {
                            value: Some(match d {
                                Ok(v) => Value::DimValue(*v),
                                Err(p) => Value::DimParam(p.to_string()),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How a tower's activations are laid out: `[N][features]` (the contract's
/// graph), or `[features][N]` with each layer as `Wᵀ · h` (the serving form).
#[derive(Clone, Copy)]
enum Layout {
    RowMajor,
    FeatureMajor,
}

/// Nodes and initializers of a scoring graph, built in order.
#[derive(Default)]
struct Graph {
    init: Vec<pb::TensorProto>,
    nodes: Vec<pb::NodeProto>,
}

impl Graph {
    /// `user_gmf`, `user_mlp` and `user_bias`: slices of the `user` tensor
    /// (the input, or the input plus the encoded history).
    fn user_slices(&mut self, weights: &NcfWeights, user: &str) {
        let (g, m, d) = (weights.gmf_dim, weights.mlp_dim, weights.user_dim());
        self.init.push(int_tensor("axis_1", &[1]));
        for (name, from, to) in [
            ("user_gmf", 0, g),
            ("user_mlp", g, g + m),
            ("user_bias", g + m, d),
        ] {
            let (f, t) = (format!("{name}_from"), format!("{name}_to"));
            self.init.push(int_tensor(&f, &[from as i64]));
            self.init.push(int_tensor(&t, &[to as i64]));
            self.nodes
                .push(node("Slice", &[user, &f, &t, "axis_1"], name, vec![]));
        }
    }

    /// The NeuMF from the user slices on: item rows, GMF product, tower, head.
    fn neumf(&mut self, weights: &NcfWeights) {
        let (g, m, n) = (weights.gmf_dim, weights.mlp_dim, weights.n_items);
        self.init
            .push(float_tensor("item_gmf", &[n, g], &weights.item_gmf));
        self.init
            .push(float_tensor("item_mlp", &[n, m], &weights.item_mlp));
        self.init
            .push(float_tensor("item_bias", &[n, 1], &weights.item_bias));
        self.gather("item_gmf", "item_gmf_rows");
        self.gather("item_mlp", "item_mlp_rows");
        self.gather("item_bias", "item_bias_rows");
        self.nodes
            .push(node("Mul", &["user_gmf", "item_gmf_rows"], "gmf", vec![]));
        self.nodes.push(node(
            "Concat",
            &["user_mlp", "item_mlp_rows"],
            "h0",
            vec![int_attribute("axis", 1)],
        ));
        let h = self.tower(weights, 0, "h0", Layout::RowMajor);
        self.head(weights, &h);
    }

    fn gather(&mut self, table: &str, out: &str) {
        self.nodes.push(node(
            "Gather",
            &[table, "item"],
            out,
            vec![int_attribute("axis", 0)],
        ));
    }

    /// The MLP layers from the `first`-th on, applied to `input` laid out as
    /// `layout` says; returns the name of the last output.
    fn tower(&mut self, weights: &NcfWeights, first: usize, input: &str, layout: Layout) -> String {
        let mut h = input.to_string();
        for (k, l) in weights.layers.iter().enumerate().skip(first) {
            let b = format!("mlp.{k}.bias");
            let w = match layout {
                Layout::RowMajor => {
                    let w = format!("mlp.{k}.weight");
                    self.init.push(float_tensor(&w, &[l.inp, l.out], &l.w));
                    self.init.push(float_tensor(&b, &[l.out], &l.b));
                    w
                }
                Layout::FeatureMajor => {
                    let w = format!("mlp.{k}.weight_t");
                    let wt = transposed(&l.w, l.inp, l.out);
                    self.init.push(float_tensor(&w, &[l.out, l.inp], &wt));
                    self.init.push(float_tensor(&b, &[l.out, 1], &l.b));
                    w
                }
            };
            let product: [&str; 2] = match layout {
                Layout::RowMajor => [&h, &w],
                Layout::FeatureMajor => [&w, &h],
            };
            let (z, zb, a) = (format!("z{k}"), format!("zb{k}"), format!("a{k}"));
            self.nodes.push(node("MatMul", &product, &z, vec![]));
            self.nodes.push(node("Add", &[&z, &b], &zb, vec![]));
            self.nodes.push(node("Relu", &[&zb], &a, vec![]));
            h = if l.residual {
                let r = format!("r{k}");
                self.nodes.push(node("Add", &[&a, &h], &r, vec![]));
                r
            } else {
                a
            };
        }
        h
    }

    /// `[gmf, h]·w_out + b_out + user_bias + item_bias`, then the link, as `score`.
    fn head(&mut self, weights: &NcfWeights, h: &str) {
        self.nodes.push(node(
            "Concat",
            &["gmf", h],
            "features",
            vec![int_attribute("axis", 1)],
        ));
        self.init.push(float_tensor(
            "out.weight",
            &[weights.out_w.len(), 1],
            &weights.out_w,
        ));
        self.init
            .push(float_tensor("out.bias", &[1], &[weights.out_b]));
        let nodes = &mut self.nodes;
        nodes.push(node("MatMul", &["features", "out.weight"], "o0", vec![]));
        nodes.push(node("Add", &["o0", "out.bias"], "o1", vec![]));
        nodes.push(node("Add", &["o1", "user_bias"], "o2", vec![]));
        nodes.push(node("Add", &["o2", "item_bias_rows"], "logit", vec![]));
        self.link(weights);
    }

    /// `score` from `logit`: the sigmoid (implicit) or the global mean added.
    fn link(&mut self, weights: &NcfWeights) {
        let nodes = &mut self.nodes;
        match weights.objective {
            Objective::Implicit => nodes.push(node("Sigmoid", &["logit"], "s", vec![])),
            Objective::Explicit => {
                self.init
                    .push(float_tensor("global_mean", &[1], &[weights.global_mean]));
                nodes.push(node("Add", &["logit", "global_mean"], "s", vec![]));
            }
        }
        self.init.push(int_tensor("flat", &[-1]));
        self.nodes
            .push(node("Reshape", &["s", "flat"], "score", vec![]));
    }

    /// The model: inputs `user` `[user_rows, user_dim]` and `item` `[N]`,
    /// output `score` `[N]`.
    fn finish(
        self,
        name: &str,
        doc: &str,
        user_rows: Result<i64, &str>,
        user_dim: usize,
        metadata: &[(&str, String)],
    ) -> Vec<u8> {
        let inputs = vec![
            value_info(
                "user",
                pb::tensor_proto::DataType::Float,
                &[user_rows, Ok(user_dim as i64)],
            ),
            value_info("item", pb::tensor_proto::DataType::Int64, &[Err("N")]),
        ];
        self.finish_with_inputs(name, doc, inputs, metadata)
    }

    /// The model with these inputs and output `score` `[N]`.
    fn finish_with_inputs(
        self,
        name: &str,
        doc: &str,
        inputs: Vec<pb::ValueInfoProto>,
        metadata: &[(&str, String)],
    ) -> Vec<u8> {
        let model = pb::ModelProto {
            ir_version: 7,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "recstream".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            model_version: 1,
            doc_string: doc.into(),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| pb::StringStringEntryProto {
                    key: format!("{META_PREFIX}{k}"),
                    value: v.clone(),
                })
                .collect(),
            graph: Some(pb::GraphProto {
                name: name.into(),
                node: self.nodes,
                initializer: self.init,
                input: inputs,
                output: vec![value_info(
                    "score",
                    pb::tensor_proto::DataType::Float,
                    &[Err("N")],
                )],
                ..Default::default()
            }),
            ..Default::default()
        };
        model.encode_to_vec()
    }
}

/// Serialises the model to ONNX bytes; the architecture and `model_version`
/// go into the model's metadata properties (the model card repeats them).
pub fn export(weights: &NcfWeights, model_version: &str) -> Vec<u8> {
    let mut graph = Graph::default();
    graph.user_slices(weights, "user");
    graph.neumf(weights);
    let metadata = metadata(weights, model_version, None);
    graph.finish(
        "neumf",
        "NeuMF (GMF + MLP) recommendation scorer; see models/README.md",
        Err("N"),
        weights.user_dim(),
        &metadata,
    )
}

/// A history-based NeuMF: the graph adds the encoded history
/// ([`HistoryEncoder`]) to its `user` input, so it takes `user` `[N, D]`
/// (the per-user part, zeros for a model without one), `history` and
/// `history_kind` int64 `[N, L]` (most recent first, kind 0 = padding) and
/// `item` `[N]`.
pub fn export_with_history(
    weights: &NcfWeights,
    encoder: &HistoryEncoder,
    model_version: &str,
) -> Vec<u8> {
    let (d, l, n) = (weights.user_dim(), encoder.max_len, weights.n_items);
    let mut graph = Graph::default();
    let kind_mask: Vec<f32> = (0..HISTORY_KINDS)
        .map(|k| if k == 0 { 0.0 } else { 1.0 })
        .collect();
    graph.init.extend([
        float_tensor("history.table", &[n, d], &encoder.table),
        float_tensor("history.base", &[d], &encoder.base),
        float_tensor("history.position_weight", &[l], &encoder.position_weight),
        float_tensor(
            "history.kind_weight",
            &[HISTORY_KINDS],
            &encoder.kind_weight,
        ),
        float_tensor("history.kind_mask", &[HISTORY_KINDS], &kind_mask),
        float_tensor("history.one", &[1], &[1.0]),
        int_tensor("history.axis_1", &[1]),
        int_tensor("history.axis_2", &[2]),
    ]);
    let gather = |table: &str, index: &str, out: &str| {
        node(
            "Gather",
            &[table, index],
            out,
            vec![int_attribute("axis", 0)],
        )
    };
    let keepdims = |v: i64| vec![int_attribute("keepdims", v)];
    graph.nodes.extend([
        gather("history.table", "history", "h_rows"),
        gather("history.kind_weight", "history_kind", "h_kind"),
        gather("history.kind_mask", "history_kind", "h_mask"),
        node(
            "ReduceSum",
            &["h_mask", "history.axis_1"],
            "h_n",
            keepdims(1),
        ),
        node("Max", &["h_n", "history.one"], "h_n1", vec![]),
        node("Sqrt", &["h_n1"], "h_norm", vec![]),
        node(
            "Mul",
            &["h_kind", "history.position_weight"],
            "h_w0",
            vec![],
        ),
        node("Div", &["h_w0", "h_norm"], "h_w", vec![]),
        node("Unsqueeze", &["h_w", "history.axis_2"], "h_w3", vec![]),
        node("Mul", &["h_rows", "h_w3"], "h_weighted", vec![]),
        node(
            "ReduceSum",
            &["h_weighted", "history.axis_1"],
            "h_sum",
            keepdims(0),
        ),
        node("Add", &["h_sum", "history.base"], "h_user", vec![]),
        node("Add", &["user", "h_user"], "user_total", vec![]),
    ]);
    graph.user_slices(weights, "user_total");
    graph.neumf(weights);
    let metadata = metadata(weights, model_version, Some(l));
    let int = pb::tensor_proto::DataType::Int64;
    let inputs = vec![
        value_info(
            "user",
            pb::tensor_proto::DataType::Float,
            &[Err("N"), Ok(d as i64)],
        ),
        value_info("history", int, &[Err("N"), Ok(l as i64)]),
        value_info("history_kind", int, &[Err("N"), Ok(l as i64)]),
        value_info("item", int, &[Err("N")]),
    ];
    graph.finish_with_inputs(
        "neumf-history",
        "History-based NeuMF (GMF + MLP, user side encoded from the last interactions); see models/README.md",
        inputs,
        &metadata,
    )
}

fn metadata(
    weights: &NcfWeights,
    model_version: &str,
    history_len: Option<usize>,
) -> Vec<(&'static str, String)> {
    let residual: Vec<String> = weights
        .layers
        .iter()
        .map(|l| u8::from(l.residual).to_string())
        .collect();
    let mut metadata = vec![
        ("objective", weights.objective.as_str().to_string()),
        ("gmf_dim", weights.gmf_dim.to_string()),
        ("mlp_dim", weights.mlp_dim.to_string()),
        ("residual", residual.join(",")),
        ("model_version", model_version.to_string()),
    ];
    if let Some(l) = history_len {
        metadata.push(("history_len", l.to_string()));
    }
    metadata
}

/// The serving tower of a model: the MLP layers after the first and the
/// output layer, for activations the engine gathers itself (see
/// `serve::Serving`). Inputs `h1` `[N, h1]` (the first layer's output, ReLU
/// applied) and `base` `[N, 1]` (every other term of the logit: the GMF
/// product and the biases); output `score` `[N]`. Together with the gather
/// it computes the same function as [`export`].
pub fn export_tower(weights: &NcfWeights) -> Vec<u8> {
    let g = weights.gmf_dim;
    let h1 = weights
        .layers
        .first()
        .map_or(2 * weights.mlp_dim, |l| l.out);
    let mut graph = Graph::default();
    // Feature-major: each layer is `W^T · h`, so tract's matrix product
    // keeps the constant weights as its pre-packed left operand and reads
    // the activations in their stored order (row-major `[N][h]` inputs
    // made it repack them transposed on every call).
    let h = graph.tower(weights, 1, "h1", Layout::FeatureMajor);
    let l = weights.out_w.len() - g;
    graph.init.push(float_tensor(
        "out.mlp_weight_t",
        &[1, l],
        &weights.out_w[g..],
    ));
    let nodes = &mut graph.nodes;
    nodes.push(node("MatMul", &["out.mlp_weight_t", &h], "mo", vec![]));
    nodes.push(node("Add", &["mo", "base"], "logit", vec![]));
    graph.link(weights);
    graph.finish_with_inputs(
        "neumf-serving-tower",
        "NeuMF serving tower: the layers after the first, for one user's candidates (built at load, never stored)",
        vec![
            value_info(
                "h1",
                pb::tensor_proto::DataType::Float,
                &[Ok(h1 as i64), Err("N")],
            ),
            value_info(
                "base",
                pb::tensor_proto::DataType::Float,
                &[Ok(1), Err("N")],
            ),
        ],
        &[],
    )
}

/// `[rows][cols]` row-major as `[cols][rows]`.
fn transposed(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| m[r * cols + c]))
        .collect()
}

fn floats(t: &pb::TensorProto) -> Result<Vec<f32>, OnnxError> {
    if t.data_type != pb::tensor_proto::DataType::Float as i32 {
        return Err(OnnxError::Contract(format!("`{}` is not float32", t.name)));
    }
    if !t.float_data.is_empty() {
        return Ok(t.float_data.clone());
    }
    if t.raw_data.len() % 4 != 0 {
        return Err(OnnxError::Contract(format!(
            "`{}` has a ragged buffer",
            t.name
        )));
    }
    Ok(t.raw_data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Reads the NeuMF weights back from an ONNX model that follows the contract's
/// initializer names (our exporter's, or a PyTorch model named the same way).
pub fn read_weights(bytes: &[u8]) -> Result<(NcfWeights, String), OnnxError> {
    let model = pb::ModelProto::decode(bytes)?;
    let meta: HashMap<&str, &str> = model
        .metadata_props
        .iter()
        .filter_map(|p| {
            p.key
                .strip_prefix(META_PREFIX)
                .map(|k| (k, p.value.as_str()))
        })
        .collect();
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| OnnxError::Contract("no graph".into()))?;
    let tensors: HashMap<&str, &pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let get = |name: &str| -> Result<(Vec<f32>, Vec<i64>), OnnxError> {
        let t = tensors
            .get(name)
            .ok_or_else(|| OnnxError::Contract(format!("missing initializer `{name}`")))?;
        Ok((floats(t)?, t.dims.clone()))
    };
    let number = |key: &str| -> Result<usize, OnnxError> {
        meta.get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| OnnxError::Contract(format!("missing metadata `{META_PREFIX}{key}`")))
    };
    let objective = match meta.get("objective") {
        Some(&"implicit") => Objective::Implicit,
        Some(&"explicit") => Objective::Explicit,
        other => {
            return Err(OnnxError::Contract(format!(
                "metadata `{META_PREFIX}objective` is {other:?}, expected implicit or explicit"
            )))
        }
    };
    let residual: Vec<bool> = meta
        .get("residual")
        .filter(|s| !s.is_empty())
        .map(|s| s.split(',').map(|v| v == "1").collect())
        .unwrap_or_default();
    let (item_bias, bias_dims) = get("item_bias")?;
    let mut layers = Vec::new();
    while let Ok((w, dims)) = get(&format!("mlp.{}.weight", layers.len())) {
        let k = layers.len();
        let (b, _) = get(&format!("mlp.{k}.bias"))?;
        let [inp, out] = dims[..] else {
            return Err(OnnxError::Contract(format!(
                "mlp.{k}.weight is not a matrix"
            )));
        };
        layers.push(Dense {
            inp: inp as usize,
            out: out as usize,
            w,
            b,
            residual: residual.get(k).copied().unwrap_or(false),
        });
    }
    let weights = NcfWeights {
        objective,
        gmf_dim: number("gmf_dim")?,
        mlp_dim: number("mlp_dim")?,
        n_items: bias_dims.first().copied().unwrap_or(0) as usize,
        item_gmf: get("item_gmf")?.0,
        item_mlp: get("item_mlp")?.0,
        item_bias,
        layers,
        out_w: get("out.weight")?.0,
        out_b: get("out.bias")?.0.first().copied().unwrap_or(0.0),
        global_mean: match objective {
            Objective::Explicit => get("global_mean")?.0.first().copied().unwrap_or(0.0),
            Objective::Implicit => 0.0,
        },
    };
    weights.validate().map_err(OnnxError::Contract)?;
    let version = meta.get("model_version").unwrap_or(&"unknown").to_string();
    Ok((weights, version))
}

/// The history encoder of a history-based model (`None` for a plain NeuMF).
pub fn read_history(bytes: &[u8]) -> Result<Option<HistoryEncoder>, OnnxError> {
    let model = pb::ModelProto::decode(bytes)?;
    let Some(graph) = model.graph.as_ref() else {
        return Ok(None);
    };
    let get = |name: &str| graph.initializer.iter().find(|t| t.name == name);
    let Some(table) = get("history.table") else {
        return Ok(None);
    };
    let read = |name: &str| -> Result<Vec<f32>, OnnxError> {
        floats(get(name).ok_or_else(|| {
            OnnxError::Contract(format!("history model without initializer `{name}`"))
        })?)
    };
    let position_weight = read("history.position_weight")?;
    Ok(Some(HistoryEncoder {
        max_len: position_weight.len(),
        position_weight,
        kind_weight: read("history.kind_weight")?,
        table: floats(table)?,
        base: read("history.base")?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ncf::model::tests::random_weights;

    #[test]
    fn weights_survive_the_round_trip() {
        for objective in [Objective::Implicit, Objective::Explicit] {
            let w = random_weights(objective, true, 3);
            let (back, version) = read_weights(&export(&w, "v-test")).unwrap();
            assert_eq!(back, w);
            assert_eq!(version, "v-test");
        }
    }

    #[test]
    fn a_history_model_round_trips_and_tract_computes_its_forward_pass() {
        let w = random_weights(Objective::Implicit, false, 5);
        let encoder = crate::ncf::history::tests::random_encoder(w.n_items, w.user_dim(), 4, 9);
        let bytes = export_with_history(&w, &encoder, "v-h");
        assert_eq!(read_weights(&bytes).unwrap().0, w);
        assert_eq!(read_history(&bytes).unwrap(), Some(encoder.clone()));
        assert_eq!(read_history(&export(&w, "v")).unwrap(), None);
        let plan = crate::ncf::serve::compile(&bytes).unwrap();
        let histories: [&[(u32, u8)]; 3] = [&[], &[(1, 4)], &[(2, 6), (0, 1), (3, 5), (1, 2)]];
        for history in histories {
            let user = encoder.user_vector(history);
            let items: Vec<i64> = (0..w.n_items as i64).collect();
            let got = crate::ncf::serve::run_history_plan(
                &plan,
                &encoder,
                &vec![0.0; w.user_dim()],
                history,
                &items,
            )
            .unwrap();
            for (i, g) in got.iter().enumerate() {
                let want = w.score(&user, i);
                assert!((g - want).abs() < 1e-5, "item {i}: tract {g}, rust {want}");
            }
        }
    }
}
