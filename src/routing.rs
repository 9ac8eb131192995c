//! Which instance answers for a user. A user's state lives on the instance
//! that owns the user's input partition; instances tell each other what they
//! own, and at which HTTP address, through a compacted topic
//! (`topics/instances.toml`): each announces itself after every rebalance and
//! every few seconds, and removes itself on a clean stop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, warn};

pub const INSTANCE_SCHEMA: &str = "recstream.instance.v1";

/// Announcements older than this many announce intervals are ignored: their
/// instance died without removing itself.
const STALE_INTERVALS: i64 = 3;

/// How producers map a key to a partition. Must match the producers of the
/// interactions topic, since a user's partition is where their events land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioner {
    /// librdkafka's default (`consistent_random`, `consistent`): CRC-32 of the key.
    Crc32,
    /// The Java client's default (`murmur2_random`, `murmur2`).
    Murmur2,
}

impl Partitioner {
    /// Reads librdkafka's `partitioner` setting from `[kafka.client]`.
    pub fn from_client_config(client: &BTreeMap<String, String>) -> Result<Partitioner, String> {
        match client.get("partitioner").map(String::as_str) {
            None | Some("consistent_random") | Some("consistent") => Ok(Partitioner::Crc32),
            Some("murmur2_random") | Some("murmur2") => Ok(Partitioner::Murmur2),
            Some(other) => Err(format!(
                "`{other}` is not supported: a user's partition must follow from the key \
                 (use consistent_random, consistent, murmur2_random or murmur2)"
            )),
        }
    }

    pub fn partition(self, key: &[u8], partitions: u32) -> u32 {
        assert!(partitions > 0, "a topic has at least one partition");
        match self {
            Partitioner::Crc32 => crc32fast::hash(key) % partitions,
            Partitioner::Murmur2 => (murmur2(key) & 0x7fff_ffff) % partitions,
        }
    }
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`).
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// One instance's record on the instances topic (`schemas/instance.v1.schema.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announcement {
    pub schema: String,
    pub instance: String,
    pub group_id: String,
    pub http_url: String,
    pub partitions: Vec<u32>,
    pub partition_count: u32,
    /// Wall clock (ms): liveness, not event time.
    pub updated_ms: i64,
}

/// The latest announcement of every instance, as read from the topic.
#[derive(Debug)]
pub struct Registry {
    me: String,
    group_id: String,
    stale_after_ms: i64,
    entries: RwLock<HashMap<String, Announcement>>,
}

impl Registry {
    pub fn new(me: &str, group_id: &str, announce_interval: Duration) -> Registry {
        Registry {
            me: me.to_string(),
            group_id: group_id.to_string(),
            stale_after_ms: STALE_INTERVALS * announce_interval.as_millis() as i64,
            entries: RwLock::new(HashMap::new()),
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// Applies one record of the topic (`None`: the instance left).
    pub fn apply(&self, key: &str, value: Option<&[u8]>) {
        let mut entries = self.entries.write().expect("not poisoned");
        match value.map(serde_json::from_slice::<Announcement>) {
            None => {
                entries.remove(key);
            }
            Some(Ok(a))
                if a.instance == key
                    && a.schema == INSTANCE_SCHEMA
                    && plausible_url(&a.http_url) =>
            {
                entries.insert(key.to_string(), a);
            }
            Some(Ok(_)) => warn!(
                key,
                "instance announcement does not match its key or has no http(s) URL; ignored"
            ),
            Some(Err(e)) => warn!(key, %e, "unreadable instance announcement; ignored"),
        }
    }

    /// Another live instance of this group that owns `partition`.
    pub fn owner(&self, partition: u32, now_ms: i64) -> Option<Announcement> {
        let entries = self.entries.read().expect("not poisoned");
        pick_owner(
            entries.values(),
            &self.me,
            &self.group_id,
            partition,
            now_ms - self.stale_after_ms,
        )
        .cloned()
    }

    /// Every live instance of this group, for `/api/instances`.
    pub fn live(&self, now_ms: i64) -> Vec<Announcement> {
        let entries = self.entries.read().expect("not poisoned");
        let mut live: Vec<Announcement> = entries
            .values()
            .filter(|a| a.group_id == self.group_id && a.updated_ms >= now_ms - self.stale_after_ms)
            .cloned()
            .collect();
        live.sort_by(|a, b| a.instance.cmp(&b.instance));
        live
    }
}

/// Clients are redirected to it: an http(s) URL that fits in a header.
fn plausible_url(url: &str) -> bool {
    (url.starts_with("http://") || url.starts_with("https://"))
        && url.len() <= 2048
        && url.bytes().all(|b| b.is_ascii_graphic())
}

/// The owner of `partition` among other instances of `group` announced since
/// `fresh_since`. While a rebalance moves a partition two instances may claim
/// it for a moment; the newer claim wins.
fn pick_owner<'a>(
    entries: impl Iterator<Item = &'a Announcement>,
    me: &str,
    group: &str,
    partition: u32,
    fresh_since: i64,
) -> Option<&'a Announcement> {
    entries
        .filter(|a| a.instance != me && a.group_id == group && a.updated_ms >= fresh_since)
        .filter(|a| a.partitions.contains(&partition))
        .max_by(|a, b| {
            a.updated_ms
                .cmp(&b.updated_ms)
                .then_with(|| b.instance.cmp(&a.instance))
        })
}

/// Reads the instances topic from its start into `registry`, until aborted.
pub async fn follow(
    registry: Arc<Registry>,
    client: ClientConfig,
    topic: String,
) -> Result<(), rdkafka::error::KafkaError> {
    let consumer: StreamConsumer = client
        .clone()
        .set("group.id", format!("recstream-routing-{}", registry.me()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    loop {
        match consumer.recv().await {
            Ok(m) => {
                let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                    continue;
                };
                registry.apply(key, m.payload());
            }
            Err(e) => {
                warn!(%e, %topic, "reading instance announcements");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// What an instance says about itself, but its partitions and time.
#[derive(Debug, Clone)]
pub struct Identity {
    pub instance: String,
    pub group_id: String,
    pub http_url: String,
}

/// Announces this instance's partitions whenever they change and every
/// `interval`; removes the instance (a tombstone) once `stop` turns true.
pub async fn announce(
    producer: FutureProducer,
    topic: String,
    me: Identity,
    mut assignment: watch::Receiver<Assignment>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = assignment.changed() => if changed.is_err() { break },
            _ = stop.wait_for(|s| *s) => break,
        }
        let current = assignment.borrow_and_update().clone();
        let record = Announcement {
            schema: INSTANCE_SCHEMA.into(),
            instance: me.instance.clone(),
            group_id: me.group_id.clone(),
            http_url: me.http_url.clone(),
            partitions: current.partitions.iter().copied().collect(),
            partition_count: current.partition_count,
            updated_ms: crate::pipeline::wall_clock_ms(),
        };
        let payload = serde_json::to_vec(&record).expect("serialisable");
        let sent = producer
            .send(
                FutureRecord::to(&topic).key(&me.instance).payload(&payload),
                Duration::from_secs(5),
            )
            .await;
        match sent {
            Ok(_) => debug!(partitions = ?record.partitions, "instance announced"),
            Err((e, _)) => warn!(%e, %topic, "announcing this instance failed; retrying"),
        }
    }
    let tombstone = FutureRecord::<String, [u8]>::to(&topic).key(&me.instance);
    if let Err((e, _)) = producer.send(tombstone, Duration::from_secs(5)).await {
        warn!(%e, %topic, "removing this instance's announcement failed; it expires");
    }
}

/// The input partitions this instance owns, and how many the topic has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    pub partitions: BTreeSet<u32>,
    pub partition_count: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn announcement(instance: &str, partitions: &[u32], updated_ms: i64) -> Announcement {
        Announcement {
            schema: INSTANCE_SCHEMA.into(),
            instance: instance.into(),
            group_id: "g".into(),
            http_url: format!("http://{instance}:9898"),
            partitions: partitions.to_vec(),
            partition_count: 4,
            updated_ms,
        }
    }

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values from Kafka's own `UtilsTest.testMurmur2`.
        let cases: [(&[u8], i32); 5] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input) as i32, expected, "{input:?}");
        }
    }

    #[test]
    fn unsupported_partitioners_are_refused() {
        let mut client = BTreeMap::new();
        assert_eq!(
            Partitioner::from_client_config(&client),
            Ok(Partitioner::Crc32)
        );
        client.insert("partitioner".into(), "murmur2_random".into());
        assert_eq!(
            Partitioner::from_client_config(&client),
            Ok(Partitioner::Murmur2)
        );
        client.insert("partitioner".into(), "random".into());
        assert!(Partitioner::from_client_config(&client).is_err());
    }

    /// librdkafka's own partitioner, through its mock broker, puts every key
    /// where [`Partitioner::partition`] says.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitions_match_librdkafka() {
        use rdkafka::mocking::MockCluster;
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 7, 1).unwrap();
        for (setting, partitioner) in [
            (None, Partitioner::Crc32),
            (Some("murmur2_random"), Partitioner::Murmur2),
        ] {
            let mut config = ClientConfig::new();
            config.set("bootstrap.servers", cluster.bootstrap_servers());
            if let Some(s) = setting {
                config.set("partitioner", s);
            }
            let producer: FutureProducer = config.create().unwrap();
            for i in 0..100 {
                let key = format!("user-{i}");
                let delivered = producer
                    .send(
                        FutureRecord::to("t").key(&key).payload("x"),
                        Duration::from_secs(5),
                    )
                    .await
                    .unwrap();
                assert_eq!(
                    delivered.partition as u32,
                    partitioner.partition(key.as_bytes(), 7),
                    "{key} with {setting:?}"
                );
            }
        }
    }

    #[test]
    fn the_newest_live_claim_of_another_instance_owns_a_partition() {
        let entries = [
            announcement("a", &[0, 1], 1_000),
            announcement("b", &[1, 2], 2_000),
            announcement("me", &[3], 2_000),
            announcement("dead", &[3], 10),
        ];
        let owner = |p| pick_owner(entries.iter(), "me", "g", p, 500).map(|a| a.instance.clone());
        assert_eq!(owner(0).as_deref(), Some("a"));
        assert_eq!(owner(1).as_deref(), Some("b"), "newer claim wins");
        assert_eq!(owner(3), None, "never myself, never a stale instance");
        let mut other_group = announcement("c", &[0], 5_000);
        other_group.group_id = "other".into();
        assert_eq!(
            pick_owner([other_group].iter(), "me", "g", 0, 0),
            None,
            "another group's instances do not count"
        );
    }

    #[test]
    fn a_tombstone_removes_an_instance() {
        let registry = Registry::new("me", "g", Duration::from_secs(5));
        let a = announcement("a", &[0], 1_000);
        registry.apply("a", Some(&serde_json::to_vec(&a).unwrap()));
        assert_eq!(
            registry.owner(0, 1_000).map(|a| a.instance),
            Some("a".into())
        );
        registry.apply("a", None);
        assert_eq!(registry.owner(0, 1_000), None);
        registry.apply("x", Some(&serde_json::to_vec(&a).unwrap()));
        assert_eq!(
            registry.owner(0, 1_000),
            None,
            "key and instance must agree"
        );
        let mut bad_url = announcement("b", &[0], 1_000);
        bad_url.http_url = "javascript:alert(1)".into();
        registry.apply("b", Some(&serde_json::to_vec(&bad_url).unwrap()));
        assert_eq!(
            registry.owner(0, 1_000),
            None,
            "only http(s) URLs are followed"
        );
    }

    proptest! {
        #[test]
        fn every_key_lands_in_range(key in proptest::collection::vec(any::<u8>(), 0..64), n in 1u32..500) {
            prop_assert!(Partitioner::Crc32.partition(&key, n) < n);
            prop_assert!(Partitioner::Murmur2.partition(&key, n) < n);
        }
    }
}
