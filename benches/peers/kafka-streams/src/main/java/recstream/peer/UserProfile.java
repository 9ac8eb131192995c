package recstream.peer;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.TreeSet;

/** A user's state in the `user-profiles` store. */
public final class UserProfile {
    /** Genre weights, all anchored at `genresAsOf`. */
    public TreeMap<String, Double> genres = new TreeMap<>();
    public long genresAsOf;
    public TreeSet<Integer> seen = new TreeSet<>();
    /** 64-bit hashes of the last event ids (the engine keeps hashes too). */
    public List<Long> recentEventIds = new ArrayList<>();
    public long lastTs;
    /** Applied events: the version of the user's outputs. */
    public long version;

    /** Applies one event; false if it was applied before (a redelivery). */
    boolean apply(Event e, List<String> movieGenres) {
        long id = eventIdHash(e.eventId);
        if (recentEventIds.contains(id)) {
            return false;
        }
        if (recentEventIds.size() >= Rules.DEDUP_WINDOW) {
            recentEventIds.remove(0);
        }
        recentEventIds.add(id);
        version++;
        lastTs = Math.max(lastTs, e.ts);
        double weight = Rules.weight(e.type, e.value);
        if (!movieGenres.isEmpty() && weight != 0.0) {
            double share = weight / movieGenres.size();
            double amount = share;
            if (e.ts >= genresAsOf) {
                double f = Rules.decayFactor(e.ts - genresAsOf, Rules.USER_HALF_LIFE_MS);
                genres.replaceAll((g, w) -> w * f);
                genresAsOf = e.ts;
            } else {
                // A late event decays back to the anchor: arrival order does not matter.
                amount = share * Rules.decayFactor(genresAsOf - e.ts, Rules.USER_HALF_LIFE_MS);
            }
            for (String g : movieGenres) {
                genres.merge(g, amount, Double::sum);
            }
        }
        if (Rules.marksSeen(e.type)) {
            seen.add(e.movieId);
        }
        return true;
    }

    /** FNV-1a, 64 bits, of the id's UTF-8 bytes. */
    static long eventIdHash(String eventId) {
        long h = 0xcbf29ce484222325L;
        for (byte b : eventId.getBytes(java.nio.charset.StandardCharsets.UTF_8)) {
            h ^= b & 0xff;
            h *= 0x100000001b3L;
        }
        return h;
    }

    /** The strongest genres with a positive weight, strongest first (ties by name). */
    List<Map.Entry<String, Double>> topGenres() {
        List<Map.Entry<String, Double>> top = new ArrayList<>();
        for (Map.Entry<String, Double> g : genres.entrySet()) {
            if (g.getValue() > 0.0) {
                top.add(g);
            }
        }
        top.sort((a, b) -> {
            int byWeight = Double.compare(b.getValue(), a.getValue());
            return byWeight != 0 ? byWeight : a.getKey().compareTo(b.getKey());
        });
        return top.subList(0, Math.min(Rules.GENRE_ROWS, top.size()));
    }
}
