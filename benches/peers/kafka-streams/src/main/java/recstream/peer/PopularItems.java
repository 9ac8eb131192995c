package recstream.peer;

import java.util.ArrayList;
import java.util.List;

/**
 * The most popular items of one genre (or of all, {@link Rules#ALL}), best
 * first, at most `capacity`. Popularity only grows with events and decays at
 * one rate for all items, so an item outside the list can only enter it when
 * it gets an event, which upserts it here: the list stays exact.
 */
public final class PopularItems {
    public static final class Entry {
        public int movieId;
        /** {@link Rules#popularityKey}: comparable across items whatever their anchors. */
        public double key;
        public long asOf;

        public Entry() {}

        Entry(int movieId, double key, long asOf) {
            this.movieId = movieId;
            this.key = key;
            this.asOf = asOf;
        }
    }

    public List<Entry> entries = new ArrayList<>();

    PopularItems upsert(int movieId, Decayed popularity, int capacity) {
        entries.removeIf(e -> e.movieId == movieId);
        Entry entry = new Entry(movieId, Rules.popularityKey(popularity.value, popularity.asOf), popularity.asOf);
        int at = 0;
        while (at < entries.size() && before(entries.get(at), entry)) {
            at++;
        }
        if (at < capacity) {
            entries.add(at, entry);
            if (entries.size() > capacity) {
                entries.remove(entries.size() - 1);
            }
        }
        return this;
    }

    /** Higher popularity first, ties by lower id. */
    static boolean before(Entry a, Entry b) {
        return a.key > b.key || (a.key == b.key && a.movieId < b.movieId);
    }
}
