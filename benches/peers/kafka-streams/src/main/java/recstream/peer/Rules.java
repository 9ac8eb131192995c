package recstream.peer;

/**
 * The seed's rules, with the engine's defaults (src/config.rs: EventWeights,
 * DecayConfig, ListConfig; src/event.rs: engages, marks_seen). Pure functions
 * of the event; no wall clock anywhere.
 */
final class Rules {
    static final double MS_PER_HOUR = 3_600_000.0;
    static final double USER_HALF_LIFE_MS = 24 * 30 * MS_PER_HOUR;
    static final double POPULARITY_HALF_LIFE_MS = 24 * 30 * MS_PER_HOUR;
    /** Genres of the user that get a carousel row and feed the list. */
    static final int GENRE_ROWS = 3;
    static final int ROW_SIZE = 10;
    /** Event ids remembered per user to apply a redelivered event once. */
    static final int DEDUP_WINDOW = 64;
    /** The list of popular items overall (cold users), beside the genres. */
    static final String ALL = "*";

    private Rules() {}

    /** The signed preference weight of one event (EventWeights::weight). */
    static double weight(String type, Double value) {
        switch (type) {
            case "view": return 0.2;
            case "click": return 0.5;
            case "play": return 1.0;
            case "progress": return 1.0 * (value == null ? 0.0 : value);
            case "complete": return 2.0;
            case "rate": return 2.0 * ((value == null ? 3.0 : value) - 3.0) / 2.0;
            case "like": return 3.0;
            case "dislike": return -3.0;
            case "watchlist_add": return 1.5;
            case "watchlist_remove": return -0.5;
            case "skip": return -1.0;
            default: throw new IllegalArgumentException("unknown event type " + type);
        }
    }

    static boolean knownType(String type) {
        switch (type) {
            case "view": case "click": case "play": case "progress": case "complete": case "rate":
            case "like": case "dislike": case "watchlist_add": case "watchlist_remove": case "skip":
                return true;
            default:
                return false;
        }
    }

    /** The user took the movie up: what popularity counts (with any positive event). */
    static boolean engages(String type) {
        switch (type) {
            case "play": case "progress": case "complete": case "rate": case "like": case "watchlist_add":
                return true;
            default:
                return false;
        }
    }

    static boolean countsForPopularity(Event e) {
        return engages(e.type) || weight(e.type, e.value) > 0.0;
    }

    static boolean marksSeen(String type) {
        return !(type.equals("view") || type.equals("click") || type.equals("watchlist_remove"));
    }

    /** 2^(-dt / half_life); 1 for non-positive dt. */
    static double decayFactor(long dtMs, double halfLifeMs) {
        return dtMs <= 0 ? 1.0 : Math.exp(-(double) dtMs * Math.log(2.0) / halfLifeMs);
    }

    /**
     * A decayed popularity as one number whose order is the order of the
     * values at any common later time: ln(value) + as_of * ln 2 / half-life.
     */
    static double popularityKey(double value, long asOf) {
        return Math.log(value) + (double) asOf * Math.log(2.0) / POPULARITY_HALF_LIFE_MS;
    }

    /** The decayed popularity at event time `now` (>= as_of) from its key. */
    static double popularityAt(double key, long now) {
        return Math.exp(key - (double) now * Math.log(2.0) / POPULARITY_HALF_LIFE_MS);
    }
}
