package recstream.peer;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.errors.WakeupException;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

/**
 * A stream processor that does nothing, with the Java clients: the floor of
 * event → output latency on a broker and a host. For every input event it
 * publishes a small record keyed by the event's user to each output topic,
 * with {@code as_of} = the event's time, so {@code recstream loadgen} reads
 * its latency exactly as it reads the engine's. Producer settings are the
 * engine's (2 ms linger, lz4, acks=all); the consumer fetches on the engine's
 * cadence (5 ms or 1 MiB) unless told otherwise.
 * {@code run.sh relay --brokers HOST:PORT [--input reco.interactions.v1]
 * [--outputs t1,t2,t3] [--fetch-wait-ms 5] [--fetch-min-bytes 1048576] [--linger-ms 2]}
 */
public final class Relay {
    private Relay() {}

    public static void main(String[] argv) throws Exception {
        Map<String, String> args = PeerApp.parse(argv);
        String brokers = PeerApp.required(args, "brokers");
        String input = args.getOrDefault("input", "reco.interactions.v1");
        List<String> outputs = List.of(
                args.getOrDefault("outputs", "reco.recommendations.v1,reco.carousels.v2,reco.insights.v1")
                        .split(","));

        Properties consumerProps = new Properties();
        consumerProps.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
        consumerProps.put(ConsumerConfig.GROUP_ID_CONFIG, args.getOrDefault("group", "recstream-relay-java"));
        consumerProps.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        consumerProps.put(ConsumerConfig.FETCH_MAX_WAIT_MS_CONFIG, args.getOrDefault("fetch-wait-ms", "5"));
        consumerProps.put(ConsumerConfig.FETCH_MIN_BYTES_CONFIG, args.getOrDefault("fetch-min-bytes", "1048576"));
        Properties producerProps = new Properties();
        producerProps.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
        producerProps.put(ProducerConfig.LINGER_MS_CONFIG, args.getOrDefault("linger-ms", "2"));
        producerProps.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, "lz4");
        producerProps.put(ProducerConfig.ACKS_CONFIG, "all");

        ObjectMapper json = new ObjectMapper();
        KafkaConsumer<String, byte[]> consumer =
                new KafkaConsumer<>(consumerProps, new StringDeserializer(), new ByteArrayDeserializer());
        KafkaProducer<String, byte[]> producer =
                new KafkaProducer<>(producerProps, new StringSerializer(), new ByteArraySerializer());
        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            consumer.wakeup();
            try {
                stopped.await();
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }));
        consumer.subscribe(List.of(input));
        System.err.printf("relay: %s -> %s%n", input, outputs);
        long version = 0;
        try {
            while (true) {
                for (ConsumerRecord<String, byte[]> record : consumer.poll(Duration.ofMillis(100))) {
                    JsonNode event;
                    try {
                        event = json.readTree(record.value());
                    } catch (java.io.IOException e) {
                        continue;
                    }
                    if (event == null || !event.hasNonNull("user_id") || !event.hasNonNull("ts")) {
                        continue;
                    }
                    String user = event.get("user_id").asText();
                    byte[] out = json.writeValueAsBytes(Map.of(
                            "user_id", user, "as_of", event.get("ts").asLong(), "version", ++version));
                    for (String topic : outputs) {
                        producer.send(new ProducerRecord<>(topic, user, out));
                    }
                }
            }
        } catch (WakeupException stopping) {
            // SIGTERM: stop consuming, deliver what is queued.
        } finally {
            producer.close(Duration.ofSeconds(10));
            consumer.close();
            stopped.countDown();
        }
    }
}
