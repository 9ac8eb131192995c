package recstream.peer;

import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.CountDownLatch;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.common.config.TopicConfig;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;

/**
 * Runs the peer until SIGTERM:
 * {@code run.sh --brokers HOST:PORT --catalog movies.csv [--input interactions]
 * [--recommendations peer.recommendations] [--carousels peer.carousels]
 * [--application-id recstream-peer] [--state-dir DIR] [--guarantee at_least_once|exactly_once_v2]
 * [--threads 1] [--commit-interval-ms MS] [--top-n 20] [--popular-per-genre 100]}
 */
public final class PeerApp {
    private PeerApp() {}

    public static void main(String[] argv) throws Exception {
        Map<String, String> args = parse(argv);
        String brokers = required(args, "brokers");
        Catalog catalog = Catalog.load(Path.of(required(args, "catalog")));
        String appId = args.getOrDefault("application-id", "recstream-peer");
        PeerTopology.Topics topics = new PeerTopology.Topics(
                args.getOrDefault("input", "interactions"),
                args.getOrDefault("recommendations", "peer.recommendations"),
                args.getOrDefault("carousels", "peer.carousels"),
                args.getOrDefault("genre-popular", appId + ".genre-popular"));
        String guarantee = args.getOrDefault("guarantee", "at_least_once");
        if (!guarantee.equals(StreamsConfig.AT_LEAST_ONCE) && !guarantee.equals(StreamsConfig.EXACTLY_ONCE_V2)) {
            throw new IllegalArgumentException("--guarantee: expected at_least_once or exactly_once_v2, got " + guarantee);
        }
        int topN = positive(args, "top-n", 20);
        int popularPerGenre = positive(args, "popular-per-genre", 100);

        Properties props = new Properties();
        props.put(StreamsConfig.APPLICATION_ID_CONFIG, appId);
        props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
        props.put(StreamsConfig.STATE_DIR_CONFIG, args.getOrDefault("state-dir", "/tmp/recstream-peer"));
        props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, guarantee);
        props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, String.valueOf(positive(args, "threads", 1)));
        if (args.containsKey("commit-interval-ms")) {
            props.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, String.valueOf(positive(args, "commit-interval-ms", 0)));
        }
        // The engine's producer settings (src/pipeline.rs): 2 ms linger (Streams' default is
        // 100 ms), lz4; everything else stays at the Kafka Streams defaults.
        props.put(StreamsConfig.producerPrefix(ProducerConfig.LINGER_MS_CONFIG), "2");
        props.put(StreamsConfig.producerPrefix(ProducerConfig.COMPRESSION_TYPE_CONFIG), "lz4");
        props.put(StreamsConfig.consumerPrefix(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG), "earliest");

        createOutputTopics(brokers, topics);
        Topology topology = PeerTopology.build(catalog, topics, topN, popularPerGenre);
        KafkaStreams streams = new KafkaStreams(topology, props);
        CountDownLatch stopped = new CountDownLatch(1);
        streams.setStateListener((now, before) -> {
            System.err.println("peer: " + before + " -> " + now);
            if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.NOT_RUNNING) {
                stopped.countDown();
            }
        });
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            streams.close();
            System.err.printf("peer: stopped; %d rejected records, %d duplicate events%n",
                    PeerMetrics.REJECTED.get(), PeerMetrics.DUPLICATES.get());
        }));
        streams.start();
        System.err.printf("peer: %s, %d movies, guarantee %s, input %s%n", appId, catalog.genres.size(), guarantee,
                topics.interactions());
        stopped.await();
        System.exit(streams.state() == KafkaStreams.State.ERROR ? 1 : 0);
    }

    /** The output topics with as many partitions as the input; the genre table compacted. */
    private static void createOutputTopics(String brokers, PeerTopology.Topics topics) throws Exception {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
        try (Admin admin = Admin.create(p)) {
            Set<String> existing = admin.listTopics().names().get();
            int partitions = admin.describeTopics(List.of(topics.interactions())).allTopicNames().get()
                    .get(topics.interactions()).partitions().size();
            List<NewTopic> create = new ArrayList<>();
            for (String t : List.of(topics.recommendations(), topics.carousels())) {
                if (!existing.contains(t)) {
                    create.add(new NewTopic(t, partitions, (short) 1));
                }
            }
            if (!existing.contains(topics.genrePopular())) {
                create.add(new NewTopic(topics.genrePopular(), 1, (short) 1)
                        .configs(Map.of(TopicConfig.CLEANUP_POLICY_CONFIG, TopicConfig.CLEANUP_POLICY_COMPACT)));
            }
            if (!create.isEmpty()) {
                admin.createTopics(create).all().get();
            }
        }
    }

    static Map<String, String> parse(String[] argv) {
        Map<String, String> args = new HashMap<>();
        for (int i = 0; i < argv.length; i++) {
            if (!argv[i].startsWith("--") || i + 1 >= argv.length) {
                throw new IllegalArgumentException("expected --name value pairs, got " + argv[i]);
            }
            args.put(argv[i].substring(2), argv[++i]);
        }
        return args;
    }

    static String required(Map<String, String> args, String name) {
        String v = args.get(name);
        if (v == null) {
            throw new IllegalArgumentException("--" + name + " is required");
        }
        return v;
    }

    private static int positive(Map<String, String> args, String name, int fallback) {
        if (!args.containsKey(name)) {
            return fallback;
        }
        try {
            int v = Integer.parseInt(args.get(name));
            if (v < 1) {
                throw new NumberFormatException();
            }
            return v;
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException("--" + name + ": expected a positive integer, got " + args.get(name));
        }
    }
}
