//! A/B variants: each user is assigned to one variant by a hash of the
//! experiment's salt and their id (stable across instances and restarts), and
//! the variant decides the blend weights, the NCF model and the candidate
//! sources. The experiment file is re-read while the engine runs (see
//! `pipeline::watch_experiment`), so shares and models change without a restart.
//!
//! ```toml
//! salt = "2026-11-home"          # a new salt reshuffles every user
//! [[variants]]
//! name = "control"
//! share = 0.5
//! [[variants]]
//! name = "ncf-heavy"
//! share = 0.5
//! model = "models/ncf-v2.onnx"   # relative to this file; "none": no model
//! ranker = "models/v2.blend.json" # a learned blend (`ranker.rs`); "none": the weights
//! sources = ["genre", "similar", "popular"]
//! [variants.blend]               # any field left out keeps the engine's value
//! ncf = 0.6
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::config::BlendWeights;
use crate::fnv::Fnv;
use crate::ncf::card::ModelFiles;
use crate::ncf::foldin::FoldInConfig;
use crate::ncf::serve::{ModelError, NcfModel, NcfScorer};
use crate::output::Source;
use crate::ranker::{LearnedBlend, RankerError};
use crate::recommend::Scorer;

/// Assignment resolution: shares are rounded to 1/10 000 of the users.
const BUCKETS: u64 = 10_000;
/// Variant names become metric labels: a bounded set.
pub const MAX_VARIANTS: usize = 16;
pub const DEFAULT_VARIANT: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("cannot read experiment file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("experiment file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid experiment: `{field}` {reason}")]
    Invalid { field: String, reason: String },
    #[error("variant `{variant}`: model {path}: {source}")]
    Model {
        variant: String,
        path: PathBuf,
        source: Box<ModelError>,
    },
    #[error("variant `{variant}`: {source}")]
    Ranker {
        variant: String,
        source: Box<RankerError>,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ExperimentError {
    ExperimentError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The experiment file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    #[serde(default = "default_salt")]
    pub salt: String,
    pub variants: Vec<VariantSpec>,
}

fn default_salt() -> String {
    "recstream".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    pub name: String,
    pub share: f64,
    /// Overrides of the engine's blend weights.
    #[serde(default)]
    pub blend: BlendOverrides,
    /// A model file, `"none"`, or absent for the engine's `[model] path`.
    pub model: Option<String>,
    /// Candidate sources; absent for all of them.
    pub sources: Option<Vec<Source>>,
    /// A learned blend file, `"none"`, or absent for the engine's `[model] ranker`.
    pub ranker: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlendOverrides {
    pub affinity: Option<f64>,
    pub similarity: Option<f64>,
    pub popularity: Option<f64>,
    pub trending: Option<f64>,
    pub co_watched: Option<f64>,
    pub ncf: Option<f64>,
}

impl BlendOverrides {
    fn apply(&self, base: &BlendWeights) -> BlendWeights {
        BlendWeights {
            affinity: self.affinity.unwrap_or(base.affinity),
            similarity: self.similarity.unwrap_or(base.similarity),
            popularity: self.popularity.unwrap_or(base.popularity),
            trending: self.trending.unwrap_or(base.trending),
            co_watched: self.co_watched.unwrap_or(base.co_watched),
            ncf: self.ncf.unwrap_or(base.ncf),
        }
    }
}

impl ExperimentSpec {
    pub fn from_file(path: &Path) -> Result<ExperimentSpec, ExperimentError> {
        let text = std::fs::read_to_string(path).map_err(|source| ExperimentError::Read {
            path: path.into(),
            source,
        })?;
        let spec: ExperimentSpec =
            toml::from_str(&text).map_err(|source| ExperimentError::Parse {
                path: path.into(),
                source: Box::new(source),
            })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), ExperimentError> {
        if self.variants.is_empty() || self.variants.len() > MAX_VARIANTS {
            return Err(invalid(
                "variants",
                format!("must list 1 to {MAX_VARIANTS} variants"),
            ));
        }
        let mut total = 0.0;
        for (i, v) in self.variants.iter().enumerate() {
            let field = |f: &str| format!("variants[{i}].{f}");
            let name_ok = !v.name.is_empty()
                && v.name.len() <= 32
                && v.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !name_ok {
                return Err(invalid(
                    field("name"),
                    "must be 1-32 characters of letters, digits, '-' or '_'",
                ));
            }
            if self.variants[..i].iter().any(|o| o.name == v.name) {
                return Err(invalid(field("name"), format!("`{}` is repeated", v.name)));
            }
            if !(v.share.is_finite() && (0.0..=1.0).contains(&v.share)) {
                return Err(invalid(field("share"), "must be between 0 and 1"));
            }
            total += v.share;
            let b = &v.blend;
            for (f, w) in [
                ("affinity", b.affinity),
                ("similarity", b.similarity),
                ("popularity", b.popularity),
                ("trending", b.trending),
                ("co_watched", b.co_watched),
                ("ncf", b.ncf),
            ] {
                if w.is_some_and(|w| !(w.is_finite() && w >= 0.0)) {
                    return Err(invalid(
                        field(&format!("blend.{f}")),
                        "must be zero or positive",
                    ));
                }
            }
            if v.sources.as_ref().is_some_and(|s| s.is_empty()) {
                return Err(invalid(field("sources"), "must name at least one source"));
            }
        }
        if (total - 1.0).abs() > 1e-6 {
            return Err(invalid(
                "variants.share",
                format!("shares must add up to 1, they add up to {total}"),
            ));
        }
        Ok(())
    }
}

/// A variant ready to serve.
pub struct Variant {
    pub name: Arc<str>,
    pub share: f64,
    pub blend: BlendWeights,
    pub scorer: Option<Arc<dyn Scorer>>,
    /// Bit set of the enabled candidate sources (see [`source_bit`]).
    pub sources: u8,
    /// The model's file, to tell which files the watcher must follow.
    pub model_path: Option<PathBuf>,
    /// Ranks candidates instead of `blend` (whose weights then come from
    /// it, to name reasons).
    pub ranker: Option<Arc<LearnedBlend>>,
    pub ranker_path: Option<PathBuf>,
}

pub fn source_bit(source: Source) -> u8 {
    match source {
        Source::Popular => 1,
        Source::Trending => 2,
        Source::Genre => 4,
        Source::Similar => 8,
        Source::CoWatched => 16,
        Source::Model => 32,
    }
}

pub const ALL_SOURCES: u8 = 0b11_1111;

/// The variants in force, with their assignment boundaries.
pub struct Variants {
    salt: String,
    list: Vec<Variant>,
    /// Exclusive upper bucket of each variant.
    upper: Vec<u64>,
}

impl Variants {
    /// One variant, `default`, with everyone in it.
    pub fn single(blend: BlendWeights, scorer: Option<Arc<dyn Scorer>>) -> Variants {
        Variants::new(
            default_salt(),
            vec![Variant {
                name: DEFAULT_VARIANT.into(),
                share: 1.0,
                blend,
                scorer,
                sources: ALL_SOURCES,
                model_path: None,
                ranker: None,
                ranker_path: None,
            }],
        )
    }

    /// Everyone in one given variant (replays, benchmarks).
    pub fn only(variant: Variant) -> Variants {
        Variants::new(default_salt(), vec![variant])
    }

    fn new(salt: String, list: Vec<Variant>) -> Variants {
        let mut acc = 0.0;
        let mut upper: Vec<u64> = list
            .iter()
            .map(|v| {
                acc += v.share;
                (acc * BUCKETS as f64).round() as u64
            })
            .collect();
        // Rounding never leaves the last buckets unassigned.
        if let Some(last) = upper.last_mut() {
            *last = BUCKETS;
        }
        Variants { salt, list, upper }
    }

    /// The user's variant: a pure function of the salt, the shares and the id.
    pub fn assign(&self, user_id: &str) -> &Variant {
        let bucket = bucket(&self.salt, user_id);
        let i = self
            .upper
            .iter()
            .position(|&u| bucket < u)
            .unwrap_or(self.list.len() - 1);
        &self.list[i]
    }

    pub fn list(&self) -> &[Variant] {
        &self.list
    }
}

/// The user's bucket in `0..BUCKETS`.
pub fn bucket(salt: &str, user_id: &str) -> u64 {
    let mut h = Fnv::default();
    h.write(salt.as_bytes());
    h.write(&[0]);
    h.write(user_id.as_bytes());
    // FNV's low bits mix poorly; fold the high half in.
    (h.0 ^ (h.0 >> 32)) % BUCKETS
}

/// What identifies a version of a file on disk: its length and mtime.
pub type Fingerprint = Vec<(PathBuf, u64, Option<std::time::SystemTime>)>;

pub fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    paths
        .iter()
        .map(|p| match std::fs::metadata(p) {
            Ok(m) => (p.clone(), m.len(), m.modified().ok()),
            Err(_) => (p.clone(), 0, None),
        })
        .collect()
}

/// Models loaded so far, by path, with the fingerprint of their files: an
/// unchanged model is reused instead of reloaded.
#[derive(Default)]
pub struct ModelCache {
    loaded: Vec<(PathBuf, Fingerprint, Arc<NcfModel>)>,
}

impl ModelCache {
    fn get(
        &mut self,
        path: &Path,
        fold_in: &FoldInConfig,
    ) -> Result<(Arc<NcfModel>, bool), ModelError> {
        let print = fingerprint(&model_files(path));
        if let Some((_, _, m)) = self
            .loaded
            .iter()
            .find(|(p, f, _)| p == path && *f == print)
        {
            return Ok((m.clone(), false));
        }
        let model = Arc::new(NcfModel::load(path, *fold_in)?);
        self.loaded.retain(|(p, _, _)| p != path);
        self.loaded.push((path.to_path_buf(), print, model.clone()));
        Ok((model, true))
    }
}

pub fn model_files(path: &Path) -> Vec<PathBuf> {
    let f = ModelFiles::new(path);
    vec![f.onnx, f.card, f.users]
}

/// Where the engine's variants come from.
#[derive(Debug, Clone)]
pub struct ExperimentSource {
    /// The experiment file; `None` serves one `default` variant.
    pub file: Option<PathBuf>,
    pub blend: BlendWeights,
    /// `[model] path`: the model of variants that name none.
    pub default_model: Option<PathBuf>,
    /// `[model] ranker`: the learned blend of variants that name none.
    pub default_ranker: Option<PathBuf>,
    pub fold_in: FoldInConfig,
}

/// A freshly built set of variants and the models it newly loaded.
pub struct Built {
    pub variants: Variants,
    pub newly_loaded: Vec<(String, String)>,
}

impl ExperimentSource {
    /// Every file whose change means the variants must be rebuilt.
    pub fn watched_files(&self, variants: &Variants) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.file.iter().cloned().collect();
        for v in variants.list() {
            if let Some(p) = &v.model_path {
                files.extend(model_files(p));
            }
            files.extend(v.ranker_path.iter().cloned());
        }
        files
    }

    /// Reads the experiment file and loads (or reuses) every model it names;
    /// any error leaves the caller's current variants in force.
    pub fn build(&self, cache: &mut ModelCache) -> Result<Built, ExperimentError> {
        let specs = match &self.file {
            Some(path) => {
                let spec = ExperimentSpec::from_file(path)?;
                let base = path.parent().unwrap_or(Path::new("."));
                let variants = spec
                    .variants
                    .into_iter()
                    .map(|v| {
                        let model = match v.model.as_deref() {
                            None => self.default_model.clone(),
                            Some("none") => None,
                            Some(p) => Some(base.join(p)),
                        };
                        let ranker = match v.ranker.as_deref() {
                            None => self.default_ranker.clone(),
                            Some("none") => None,
                            Some(p) => Some(base.join(p)),
                        };
                        (v, model, ranker)
                    })
                    .collect();
                (spec.salt, variants)
            }
            None => {
                let v = VariantSpec {
                    name: DEFAULT_VARIANT.into(),
                    share: 1.0,
                    blend: BlendOverrides::default(),
                    model: None,
                    sources: None,
                    ranker: None,
                };
                (
                    default_salt(),
                    vec![(v, self.default_model.clone(), self.default_ranker.clone())],
                )
            }
        };
        let (salt, specs) = specs;
        let mut list = Vec::new();
        let mut newly_loaded = Vec::new();
        for (spec, model_path, ranker_path) in specs {
            let scorer: Option<Arc<dyn Scorer>> = match &model_path {
                Some(path) => {
                    let (model, fresh) = cache.get(path, &self.fold_in).map_err(|source| {
                        ExperimentError::Model {
                            variant: spec.name.clone(),
                            path: path.clone(),
                            source: Box::new(source),
                        }
                    })?;
                    if fresh {
                        newly_loaded.push((spec.name.clone(), model.card.model_version.clone()));
                    }
                    Some(Arc::new(NcfScorer { model }))
                }
                None => None,
            };
            let sources = spec
                .sources
                .as_ref()
                .map_or(ALL_SOURCES, |s| s.iter().fold(0, |b, s| b | source_bit(*s)));
            // A learned blend is a few hundred bytes: read again on every build.
            let ranker = match &ranker_path {
                Some(path) => {
                    let ranker =
                        LearnedBlend::load(path).map_err(|source| ExperimentError::Ranker {
                            variant: spec.name.clone(),
                            source: Box::new(source),
                        })?;
                    Some(Arc::new(ranker))
                }
                None => None,
            };
            let blend = match &ranker {
                Some(r) => r.reason_weights(),
                None => spec.blend.apply(&self.blend),
            };
            list.push(Variant {
                name: spec.name.as_str().into(),
                share: spec.share,
                blend,
                scorer,
                sources,
                model_path,
                ranker,
                ranker_path,
            });
        }
        Ok(Built {
            variants: Variants::new(salt, list),
            newly_loaded,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn variants(shares: &[f64]) -> Variants {
        Variants::new(
            "s".into(),
            shares
                .iter()
                .enumerate()
                .map(|(i, &share)| Variant {
                    name: format!("v{i}").into(),
                    share,
                    blend: BlendWeights::default(),
                    scorer: None,
                    sources: ALL_SOURCES,
                    model_path: None,
                    ranker: None,
                    ranker_path: None,
                })
                .collect(),
        )
    }

    #[test]
    fn shares_split_users_in_proportion() {
        let v = variants(&[0.2, 0.3, 0.5]);
        let mut counts = [0usize; 3];
        for u in 0..20_000 {
            let name = &v.assign(&format!("user-{u}")).name;
            counts[name[1..].parse::<usize>().unwrap()] += 1;
        }
        for (c, share) in counts.iter().zip([0.2, 0.3, 0.5]) {
            let got = *c as f64 / 20_000.0;
            assert!((got - share).abs() < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn moving_share_moves_only_the_users_at_the_boundary() {
        // 50/50 -> 70/30: users of v0 stay in v0; only v1 users move.
        let before = variants(&[0.5, 0.5]);
        let after = variants(&[0.7, 0.3]);
        for u in 0..5_000 {
            let id = format!("u{u}");
            if &*before.assign(&id).name == "v0" {
                assert_eq!(&*after.assign(&id).name, "v0");
            }
        }
    }

    #[test]
    fn invalid_files_name_the_field() {
        let parse = |t: &str| {
            toml::from_str::<ExperimentSpec>(t)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        let e = parse("[[variants]]\nname = \"a\"\nshare = 0.4\n");
        assert!(e.contains("variants.share") && e.contains("0.4"), "{e}");
        let e = parse("[[variants]]\nname = \"a b\"\nshare = 1.0\n");
        assert!(e.contains("variants[0].name"), "{e}");
        let e = parse("[[variants]]\nname = \"a\"\nshare = 1.0\n[variants.blend]\nncf = -1\n");
        assert!(e.contains("variants[0].blend.ncf"), "{e}");
        let e = parse(
            "[[variants]]\nname = \"a\"\nshare = 0.5\n[[variants]]\nname = \"a\"\nshare = 0.5\n",
        );
        assert!(e.contains("repeated"), "{e}");
    }

    #[test]
    fn variants_load_their_learned_blend_and_refuse_a_bad_one() {
        use crate::ranker::{learned_blend, FitReport, FEATURE_COUNT};
        let dir = tempfile::tempdir().unwrap();
        let mut weights = vec![0.0; FEATURE_COUNT];
        weights[4] = 5.0;
        weights[0] = 1.0;
        let blend = learned_blend(
            "b-7".into(),
            "test".into(),
            None,
            weights,
            FitReport {
                cases: 1,
                newton_iterations: 1,
                ..FitReport::default()
            },
        );
        blend.save(&dir.path().join("b.blend.json")).unwrap();
        let file = dir.path().join("exp.toml");
        std::fs::write(
            &file,
            "[[variants]]\nname = \"learned\"\nshare = 0.5\nranker = \"b.blend.json\"\n\
             [[variants]]\nname = \"hand\"\nshare = 0.5\nranker = \"none\"\n",
        )
        .unwrap();
        let source = ExperimentSource {
            file: Some(file.clone()),
            blend: BlendWeights::default(),
            default_model: None,
            default_ranker: Some(dir.path().join("missing.blend.json")),
            fold_in: FoldInConfig::default(),
        };
        let built = source.build(&mut ModelCache::default()).unwrap();
        let [learned, hand] = built.variants.list() else {
            panic!("two variants")
        };
        assert_eq!(learned.ranker.as_deref(), Some(&blend));
        assert_eq!(
            learned.blend.co_watched, 5.0,
            "reasons follow the learned weights"
        );
        assert!(hand.ranker.is_none());
        assert_eq!(hand.blend.co_watched, BlendWeights::default().co_watched);
        assert!(source
            .watched_files(&built.variants)
            .contains(&dir.path().join("b.blend.json")));

        std::fs::write(dir.path().join("b.blend.json"), "{\"schema\": 1}").unwrap();
        let e = source
            .build(&mut ModelCache::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("variant `learned`") && e.contains("b.blend.json"),
            "{e}"
        );
    }

    proptest! {
        #[test]
        fn assignment_is_a_pure_function_of_salt_and_user(user in "[a-z0-9]{1,12}", a in 0.0f64..1.0) {
            let v = variants(&[a, 1.0 - a]);
            let w = variants(&[a, 1.0 - a]);
            prop_assert_eq!(&v.assign(&user).name, &w.assign(&user).name);
            prop_assert!(bucket("s", &user) < BUCKETS);
        }
    }
}
