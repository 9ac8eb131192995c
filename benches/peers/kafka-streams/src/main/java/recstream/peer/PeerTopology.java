package recstream.peer;

import java.util.ArrayList;
import java.util.List;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.KStream;
import org.apache.kafka.streams.kstream.KTable;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.Stores;
import org.apache.kafka.streams.state.ValueAndTimestamp;

/**
 * The seed's job as a Kafka Streams application:
 *
 * <pre>
 * interactions (keyed by user)
 *   └─ per user (store "user-profiles"): decayed genre weights, seen items, recent event ids
 *         ├─ list + carousels from the global table ─ recommendations, carousels topics
 *         └─ applied events counted for popularity ─ re-key by item ─ aggregate: decayed
 *               popularity per item (KTable) ─ per genre of the item, and "*" ─ re-key by
 *               genre ─ aggregate: its popular items (KTable) ─ genre-popular topic
 *               ─ GlobalKTable "genre-popular" (read by every instance's user processor)
 * </pre>
 */
final class PeerTopology {
    static final String PROFILES = "user-profiles";
    static final String GENRE_POPULAR = "genre-popular";

    record Topics(String interactions, String recommendations, String carousels, String genrePopular) {}

    private PeerTopology() {}

    static Topology build(Catalog catalog, Topics topics, int topN, int popularPerGenre) {
        Serde<Decayed> decayedSerde = Json.serde(Decayed.class);
        Serde<PopularItems> popularSerde = Json.serde(PopularItems.class);
        Serde<ItemPopularity> itemSerde = Json.serde(ItemPopularity.class);
        StreamsBuilder builder = new StreamsBuilder();
        builder.addStateStore(Stores.keyValueStoreBuilder(
                Stores.persistentKeyValueStore(PROFILES), Serdes.String(), Json.serde(UserProfile.class)));

        KStream<String, Event> events = builder
                .stream(topics.interactions(), Consumed.with(Serdes.String(), Json.events()))
                .filter((user, e) -> {
                    boolean ok = e != null && catalog.contains(e.movieId);
                    if (!ok) {
                        PeerMetrics.REJECTED.incrementAndGet();
                    }
                    return ok;
                });

        // Each applied event (a redelivered one is applied once) with the user's new outputs.
        KStream<String, Applied> applied =
                events.process(() -> new UserProcessor(catalog, new Recommender(catalog, topN)), PROFILES);
        applied.mapValues(a -> a.outputs().recommendations())
                .to(topics.recommendations(), Produced.with(Serdes.String(), Serdes.String()));
        applied.mapValues(a -> a.outputs().carousels())
                .to(topics.carousels(), Produced.with(Serdes.String(), Serdes.String()));

        KTable<Integer, Decayed> itemPopularity = applied
                .filter((user, a) -> Rules.countsForPopularity(a.event()))
                .map((user, a) -> KeyValue.pair(a.event().movieId, a.event().ts))
                .groupByKey(Grouped.with("item-events", Serdes.Integer(), Serdes.Long()))
                .aggregate(Decayed::new,
                        (item, ts, popularity) -> popularity.add(1.0, ts, Rules.POPULARITY_HALF_LIFE_MS),
                        Materialized.<Integer, Decayed, KeyValueStore<Bytes, byte[]>>as("item-popularity")
                                .withKeySerde(Serdes.Integer()).withValueSerde(decayedSerde));
        itemPopularity.toStream()
                .flatMap((item, popularity) -> {
                    List<KeyValue<String, ItemPopularity>> out = new ArrayList<>();
                    ItemPopularity update = new ItemPopularity(item, popularity);
                    for (String g : catalog.genresOf(item)) {
                        out.add(KeyValue.pair(g, update));
                    }
                    out.add(KeyValue.pair(Rules.ALL, update));
                    return out;
                })
                .groupByKey(Grouped.with("genre-items", Serdes.String(), itemSerde))
                .aggregate(PopularItems::new,
                        (genre, update, popular) -> popular.upsert(update.movieId, update.popularity, popularPerGenre),
                        Materialized.<String, PopularItems, KeyValueStore<Bytes, byte[]>>as("genre-popular-by-partition")
                                .withKeySerde(Serdes.String()).withValueSerde(popularSerde))
                .toStream()
                .to(topics.genrePopular(), Produced.with(Serdes.String(), popularSerde));
        builder.globalTable(topics.genrePopular(), Consumed.with(Serdes.String(), popularSerde),
                Materialized.<String, PopularItems, KeyValueStore<Bytes, byte[]>>as(GENRE_POPULAR)
                        .withKeySerde(Serdes.String()).withValueSerde(popularSerde));

        return builder.build();
    }

    /** An event that changed its user's profile, and the user's outputs after it. */
    record Applied(Event event, Recommender.Outputs outputs) {}

    /** A new popularity of one item, on its way to the genres it belongs to. */
    public static final class ItemPopularity {
        public int movieId;
        public Decayed popularity;

        public ItemPopularity() {}

        ItemPopularity(int movieId, Decayed popularity) {
            this.movieId = movieId;
            this.popularity = popularity;
        }
    }

    /** Applies each event to its user's profile and recomputes the user's outputs. */
    static final class UserProcessor implements Processor<String, Event, String, Applied> {
        private final Catalog catalog;
        private final Recommender recommender;
        private ProcessorContext<String, Applied> context;
        private KeyValueStore<String, UserProfile> profiles;
        private KeyValueStore<String, ValueAndTimestamp<PopularItems>> popular;

        UserProcessor(Catalog catalog, Recommender recommender) {
            this.catalog = catalog;
            this.recommender = recommender;
        }

        @Override
        public void init(ProcessorContext<String, Applied> context) {
            this.context = context;
            this.profiles = context.getStateStore(PROFILES);
            this.popular = context.getStateStore(GENRE_POPULAR);
        }

        @Override
        public void process(Record<String, Event> record) {
            Event e = record.value();
            UserProfile profile = profiles.get(e.userId);
            if (profile == null) {
                profile = new UserProfile();
            }
            if (!profile.apply(e, catalog.genresOf(e.movieId))) {
                PeerMetrics.DUPLICATES.incrementAndGet();
                return;
            }
            profiles.put(e.userId, profile);
            Recommender.Outputs out = recommender.recommend(e.userId, profile, genre -> {
                ValueAndTimestamp<PopularItems> v = popular.get(genre);
                return v == null ? null : v.value();
            });
            context.forward(record.withKey(e.userId).withValue(new Applied(e, out)));
        }
    }
}
