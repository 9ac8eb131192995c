package recstream.peer;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.fasterxml.jackson.databind.JsonNode;
import java.io.InputStream;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.TestInputTopic;
import org.apache.kafka.streams.TestOutputTopic;
import org.apache.kafka.streams.TopologyTestDriver;
import org.junit.jupiter.api.Test;

/** The peer's outputs on the shared fixture are what reference.py's rules give. */
class ParityTest {
    private static final PeerTopology.Topics TOPICS =
            new PeerTopology.Topics("interactions", "recs", "carousels", "genre-popular");

    @Test
    void lastOutputsOfEveryUserMatchTheReference() throws Exception {
        JsonNode fixture;
        try (InputStream in = ParityTest.class.getResourceAsStream("/parity.json")) {
            fixture = Json.MAPPER.readTree(in);
        }
        Map<Integer, List<String>> genres = new HashMap<>();
        fixture.get("catalog").fields().forEachRemaining(f -> {
            List<String> gs = new ArrayList<>();
            f.getValue().forEach(g -> gs.add(g.asText()));
            genres.put(Integer.parseInt(f.getKey()), gs);
        });
        JsonNode rules = fixture.get("rules");
        assertEquals(Rules.GENRE_ROWS, rules.get("genre_rows").asInt());
        assertEquals(Rules.ROW_SIZE, rules.get("row_size").asInt());
        assertEquals(Rules.DEDUP_WINDOW, rules.get("dedup_window").asInt());
        // The full weight of each type: 5 stars, a whole progress.
        Map<String, Double> fullValue = Map.of("rate", 5.0, "progress", 1.0);
        rules.get("event_weights").fields().forEachRemaining(w -> assertEquals(
                w.getValue().asDouble(), Rules.weight(w.getKey(), fullValue.get(w.getKey())), w.getKey()));

        Properties props = new Properties();
        props.put(StreamsConfig.APPLICATION_ID_CONFIG, "parity");
        props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, "unused:9092");
        props.put(StreamsConfig.STATE_DIR_CONFIG, Files.createTempDirectory("peer-parity").toString());
        // No record cache: every update flows on at once, as the reference assumes.
        props.put(StreamsConfig.STATESTORE_CACHE_MAX_BYTES_CONFIG, "0");
        var topology = PeerTopology.build(new Catalog(genres), TOPICS, rules.get("top_n").asInt(),
                rules.get("popular_per_genre").asInt());
        Map<String, JsonNode> lastRecs = new HashMap<>();
        Map<String, JsonNode> lastCarousels = new HashMap<>();
        int outputs = 0;
        try (TopologyTestDriver driver = new TopologyTestDriver(topology, props)) {
            TestInputTopic<String, String> in =
                    driver.createInputTopic("interactions", new StringSerializer(), new StringSerializer());
            TestOutputTopic<String, String> recs =
                    driver.createOutputTopic("recs", new StringDeserializer(), new StringDeserializer());
            TestOutputTopic<String, String> carousels =
                    driver.createOutputTopic("carousels", new StringDeserializer(), new StringDeserializer());
            for (JsonNode r : fixture.get("records")) {
                in.pipeInput(r.get("key").asText(), r.get("value").asText());
                for (var kv : recs.readKeyValuesToList()) {
                    lastRecs.put(kv.key, Json.MAPPER.readTree(kv.value));
                    outputs++;
                }
                for (var kv : carousels.readKeyValuesToList()) {
                    lastCarousels.put(kv.key, Json.MAPPER.readTree(kv.value));
                }
            }
        }
        assertEquals(fixture.get("applied_events").asInt(), outputs, "one list per applied event");
        assertEquals(3, PeerMetrics.REJECTED.get(), "the fixture's three invalid records");
        JsonNode expected = fixture.get("expected");
        assertEquals(expected.size(), lastRecs.size());
        expected.fields().forEachRemaining(u -> {
            String user = u.getKey();
            JsonNode want = u.getValue().get("recommendations");
            JsonNode got = lastRecs.get(user);
            assertEquals(want.get("version").asLong(), got.get("version").asLong(), user);
            assertEquals(want.get("as_of").asLong(), got.get("as_of").asLong(), user);
            assertEquals(ids(want.get("items")), ids(got.get("items")), user + ": list");
            for (int i = 0; i < want.get("items").size(); i++) {
                double a = want.get("items").get(i).get("score").asDouble();
                double b = got.get("items").get(i).get("score").asDouble();
                assertTrue(Math.abs(a - b) <= 1e-9 * Math.max(1.0, Math.abs(a)), user + ": score " + a + " vs " + b);
            }
            assertEquals(u.getValue().get("carousels").get("rows"), lastCarousels.get(user).get("rows"),
                    user + ": carousels");
        });
    }

    private static List<Integer> ids(JsonNode items) {
        List<Integer> ids = new ArrayList<>();
        items.forEach(i -> ids.add(i.get("movie_id").asInt()));
        return ids;
    }
}
