package recstream.peer;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import org.apache.kafka.common.errors.SerializationException;
import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.Serializer;

/** JSON serdes: state values with Jackson, events checked against the interaction schema. */
final class Json {
    static final ObjectMapper MAPPER = new ObjectMapper();

    private Json() {}

    static <T> Serde<T> serde(Class<T> type) {
        Serializer<T> ser = (topic, value) -> {
            try {
                return value == null ? null : MAPPER.writeValueAsBytes(value);
            } catch (IOException e) {
                throw new SerializationException(e);
            }
        };
        Deserializer<T> de = (topic, bytes) -> {
            try {
                return bytes == null ? null : MAPPER.readValue(bytes, type);
            } catch (IOException e) {
                throw new SerializationException(e);
            }
        };
        return Serdes.serdeFrom(ser, de);
    }

    /** Interactions; a record that is not a valid interaction reads as null (filtered and counted). */
    static Serde<Event> events() {
        Serializer<Event> ser = (topic, e) -> {
            throw new UnsupportedOperationException("the peer never writes interactions");
        };
        Deserializer<Event> de = (topic, bytes) -> bytes == null ? null : parseEvent(bytes);
        return Serdes.serdeFrom(ser, de);
    }

    static Event parseEvent(byte[] bytes) {
        try {
            JsonNode n = MAPPER.readTree(bytes);
            Event e = new Event();
            e.eventId = n.path("event_id").asText("");
            JsonNode user = n.path("user_id");
            e.userId = user.isIntegralNumber() ? user.asText() : user.isTextual() ? user.asText() : "";
            e.movieId = n.path("movie_id").isIntegralNumber() ? n.path("movie_id").asInt() : 0;
            e.type = n.path("type").asText("");
            e.value = n.path("value").isNumber() ? n.path("value").asDouble() : null;
            e.ts = n.path("ts").isIntegralNumber() ? n.path("ts").asLong() : 0;
            boolean needsValue = e.type.equals("rate") || e.type.equals("progress");
            if (e.eventId.isEmpty() || e.userId.isEmpty() || e.movieId < 1 || e.ts < 1
                    || !Rules.knownType(e.type) || (needsValue && e.value == null)) {
                return null;
            }
            return e;
        } catch (IOException | RuntimeException ex) {
            return null;
        }
    }
}
