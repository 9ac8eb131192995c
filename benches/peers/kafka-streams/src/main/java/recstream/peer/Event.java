package recstream.peer;

/** One interaction (schemas/interaction.v1.schema.json), as far as the seed's rules read it. */
final class Event {
    String eventId;
    String userId;
    int movieId;
    String type;
    Double value;
    long ts;
}
