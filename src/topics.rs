//! Declarative topics (`topics/*.toml`, one file per topic) and their idempotent
//! application to a cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};

use crate::config::TopicNames;

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("cannot read topic declarations in {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("topic declaration {path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("kafka admin: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("creating topic {topic}: {detail}")]
    Create { topic: String, detail: String },
    #[error("topic {topic} exists with {actual} partitions; the declaration wants {declared}")]
    PartitionMismatch {
        topic: String,
        actual: usize,
        declared: usize,
    },
}

/// Which role a topic plays; lets the engine map declarations onto its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Interactions,
    Catalog,
    Recommendations,
    Carousels,
    Insights,
    Refresh,
    DeadLetters,
    Changelog,
    Instances,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicDecl {
    pub name: String,
    pub role: Role,
    pub description: String,
    pub partitions: i32,
    #[serde(default = "one")]
    pub replication_factor: i32,
    /// What the record key is (documentation; producers must follow it).
    pub key: String,
    /// `delete` or `compact`.
    pub cleanup_policy: String,
    /// -1 keeps records forever.
    pub retention_ms: i64,
    /// Path of the value's JSON schema, relative to the repository.
    pub schema: Option<String>,
    /// Extra topic configs passed to the broker verbatim.
    #[serde(default)]
    pub configs: BTreeMap<String, String>,
}

fn one() -> i32 {
    1
}

pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 249 {
        return Err("must be 1..=249 characters".into());
    }
    if name == "." || name == ".." {
        return Err("must not be `.` or `..`".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "{name:?} may only contain ASCII letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

impl TopicDecl {
    fn validate(&self, path: &Path) -> Result<(), TopicError> {
        let bad = |detail: String| TopicError::Invalid {
            path: path.into(),
            detail,
        };
        validate_topic_name(&self.name).map_err(|e| bad(format!("`name` {e}")))?;
        if !(1..=10_000).contains(&self.partitions) {
            return Err(bad("`partitions` must be in 1..=10000".into()));
        }
        if self.replication_factor < 1 {
            return Err(bad("`replication_factor` must be >= 1".into()));
        }
        if !matches!(
            self.cleanup_policy.as_str(),
            "delete" | "compact" | "compact,delete"
        ) {
            return Err(bad(
                "`cleanup_policy` must be delete, compact or compact,delete".into(),
            ));
        }
        if self.retention_ms < -1 || self.retention_ms == 0 {
            return Err(bad("`retention_ms` must be -1 (forever) or positive".into()));
        }
        Ok(())
    }

    /// Broker-side topic configs.
    pub fn broker_configs(&self) -> Vec<(String, String)> {
        let mut c: Vec<(String, String)> = vec![
            ("cleanup.policy".into(), self.cleanup_policy.clone()),
            ("retention.ms".into(), self.retention_ms.to_string()),
        ];
        c.extend(self.configs.iter().map(|(k, v)| (k.clone(), v.clone())));
        c
    }
}

/// The declarations in this repository's `topics/`, compiled in so the binary
/// can apply them from anywhere.
pub fn builtin() -> Vec<TopicDecl> {
    const FILES: [(&str, &str); 9] = [
        ("carousels.toml", include_str!("../topics/carousels.toml")),
        ("catalog.toml", include_str!("../topics/catalog.toml")),
        ("changelog.toml", include_str!("../topics/changelog.toml")),
        (
            "dead_letters.toml",
            include_str!("../topics/dead_letters.toml"),
        ),
        ("insights.toml", include_str!("../topics/insights.toml")),
        ("instances.toml", include_str!("../topics/instances.toml")),
        (
            "interactions.toml",
            include_str!("../topics/interactions.toml"),
        ),
        (
            "recommendations.toml",
            include_str!("../topics/recommendations.toml"),
        ),
        ("refresh.toml", include_str!("../topics/refresh.toml")),
    ];
    FILES
        .iter()
        .map(|(name, text)| {
            let decl: TopicDecl =
                toml::from_str(text).unwrap_or_else(|e| panic!("topics/{name}: {e}"));
            decl
        })
        .collect()
}

/// Reads every `*.toml` in `dir`, sorted by file name.
pub fn load_dir(dir: &Path) -> Result<Vec<TopicDecl>, TopicError> {
    let read_err = |source| TopicError::Read {
        path: dir.into(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let mut decls = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|source| TopicError::Read {
            path: path.clone(),
            source,
        })?;
        let decl: TopicDecl = toml::from_str(&text).map_err(|e| TopicError::Invalid {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        decl.validate(&path)?;
        decls.push(decl);
    }
    let mut roles: Vec<Role> = decls.iter().map(|d| d.role).collect();
    roles.sort();
    roles.dedup();
    if roles.len() != decls.len() {
        return Err(TopicError::Invalid {
            path: dir.into(),
            detail: "two declarations share a role".into(),
        });
    }
    Ok(decls)
}

/// Renames declared topics to the names configured for their roles.
pub fn with_names(mut decls: Vec<TopicDecl>, names: &TopicNames) -> Vec<TopicDecl> {
    for d in &mut decls {
        d.name = match d.role {
            Role::Interactions => names.interactions.clone(),
            Role::Catalog => names.catalog.clone(),
            Role::Recommendations => names.recommendations.clone(),
            Role::Carousels => names.carousels.clone(),
            Role::Insights => names.insights.clone(),
            Role::Refresh => names.refresh.clone(),
            Role::DeadLetters => names.dead_letters.clone(),
            Role::Changelog => names.changelog.clone(),
            Role::Instances => names.instances.clone(),
        };
    }
    decls
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Created,
    AlreadyExists,
}

/// Creates missing topics; existing ones are checked for their partition count.
/// Running it twice is harmless.
pub async fn apply(
    client_config: &ClientConfig,
    decls: &[TopicDecl],
) -> Result<Vec<(String, Applied)>, TopicError> {
    let admin: AdminClient<DefaultClientContext> = client_config.create()?;
    let existing = partition_counts(client_config)?;
    let mut report = Vec::new();
    let mut to_create = Vec::new();
    for d in decls {
        match existing.get(&d.name) {
            Some(&actual) if actual != d.partitions as usize => {
                return Err(TopicError::PartitionMismatch {
                    topic: d.name.clone(),
                    actual,
                    declared: d.partitions as usize,
                })
            }
            Some(_) => report.push((d.name.clone(), Applied::AlreadyExists)),
            None => to_create.push(d),
        }
    }
    if to_create.is_empty() {
        return Ok(report);
    }
    let configs: Vec<Vec<(String, String)>> =
        to_create.iter().map(|d| d.broker_configs()).collect();
    let new_topics: Vec<NewTopic> = to_create
        .iter()
        .zip(&configs)
        .map(|(d, cfg)| {
            cfg.iter().fold(
                NewTopic::new(
                    &d.name,
                    d.partitions,
                    TopicReplication::Fixed(d.replication_factor),
                ),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for outcome in admin.create_topics(&new_topics, &opts).await? {
        match outcome {
            Ok(name) => report.push((name, Applied::Created)),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                report.push((name, Applied::AlreadyExists))
            }
            Err((name, code)) => {
                return Err(TopicError::Create {
                    topic: name,
                    detail: code.to_string(),
                })
            }
        }
    }
    Ok(report)
}

/// Partition count of every topic in the cluster.
pub fn partition_counts(
    client_config: &ClientConfig,
) -> Result<BTreeMap<String, usize>, TopicError> {
    let consumer: BaseConsumer = client_config.create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(15))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| (t.name().to_string(), t.partitions().len()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_declarations_are_valid_and_cover_every_role() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("topics");
        let decls = load_dir(&dir).unwrap();
        assert_eq!(decls.len(), 9);
        assert_eq!(
            builtin(),
            decls,
            "built-in declarations are the committed files"
        );
        let names = TopicNames::default();
        for d in with_names(decls.clone(), &names) {
            let original = decls.iter().find(|o| o.role == d.role).unwrap();
            assert_eq!(
                original.name, d.name,
                "declared names match the default config"
            );
            if let Some(schema) = &d.schema {
                assert!(
                    Path::new(env!("CARGO_MANIFEST_DIR")).join(schema).exists(),
                    "{schema}"
                );
            }
        }
        let interactions = decls.iter().find(|d| d.role == Role::Interactions).unwrap();
        let refresh = decls.iter().find(|d| d.role == Role::Refresh).unwrap();
        assert_eq!(
            interactions.partitions, refresh.partitions,
            "refresh is co-partitioned"
        );
        let changelog = decls.iter().find(|d| d.role == Role::Changelog).unwrap();
        assert_eq!(
            interactions.partitions, changelog.partitions,
            "the changelog is partitioned like the input"
        );
        assert_eq!(changelog.cleanup_policy, "compact");
    }

    #[test]
    fn topic_names_are_checked() {
        assert!(validate_topic_name("reco.interactions.v1").is_ok());
        assert!(validate_topic_name("bad name").is_err());
        assert!(validate_topic_name("").is_err());
    }
}
