package recstream.peer;

import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.function.Function;

/**
 * A user's top-N list and genre carousels from their profile and the popular
 * items of their strongest genres (the seed's rules):
 * - list: unseen items among the popular items of the user's top genres,
 *   scored by popularity x the share of the top genres' weight the item's
 *   genres hold; a user with no positive genre gets the popular items overall;
 * - carousels: per top genre, its most popular unseen items.
 */
final class Recommender {
    record Outputs(String recommendations, String carousels) {}

    private final Catalog catalog;
    private final int topN;

    Recommender(Catalog catalog, int topN) {
        this.catalog = catalog;
        this.topN = topN;
    }

    Outputs recommend(String userId, UserProfile p, Function<String, PopularItems> popular) {
        List<Map.Entry<String, Double>> top = p.topGenres();
        double topWeight = top.stream().mapToDouble(Map.Entry::getValue).sum();
        Map<String, PopularItems> lists = new HashMap<>();
        for (Map.Entry<String, Double> g : top) {
            lists.put(g.getKey(), orEmpty(popular.apply(g.getKey())));
        }
        if (top.isEmpty()) {
            lists.put(Rules.ALL, orEmpty(popular.apply(Rules.ALL)));
        }
        // Popularity read at one time not before any anchor, so scores compare.
        long now = p.lastTs;
        for (PopularItems l : lists.values()) {
            for (PopularItems.Entry e : l.entries) {
                now = Math.max(now, e.asOf);
            }
        }
        Map<Integer, Double> scores = new HashMap<>();
        for (PopularItems l : lists.values()) {
            for (PopularItems.Entry e : l.entries) {
                if (p.seen.contains(e.movieId) || scores.containsKey(e.movieId)) {
                    continue;
                }
                double share = 1.0;
                if (!top.isEmpty()) {
                    List<String> genres = catalog.genresOf(e.movieId);
                    double held = 0.0;
                    for (Map.Entry<String, Double> g : top) {
                        if (genres.contains(g.getKey())) {
                            held += g.getValue();
                        }
                    }
                    share = held / topWeight;
                }
                scores.put(e.movieId, share * Rules.popularityAt(e.key, now));
            }
        }
        List<Map.Entry<Integer, Double>> ranked = new ArrayList<>(scores.entrySet());
        ranked.sort((a, b) -> {
            int byScore = Double.compare(b.getValue(), a.getValue());
            return byScore != 0 ? byScore : Integer.compare(a.getKey(), b.getKey());
        });

        ObjectNode rec = header(userId, p);
        ArrayNode items = rec.putArray("items");
        for (Map.Entry<Integer, Double> r : ranked.subList(0, Math.min(topN, ranked.size()))) {
            items.addObject().put("movie_id", r.getKey()).put("score", r.getValue());
        }
        ObjectNode car = header(userId, p);
        ArrayNode rows = car.putArray("rows");
        List<String> rowGenres = new ArrayList<>();
        top.forEach(g -> rowGenres.add(g.getKey()));
        if (top.isEmpty()) {
            rowGenres.add(Rules.ALL);
        }
        for (String g : rowGenres) {
            ObjectNode row = rows.addObject().put("id", g.equals(Rules.ALL) ? "popular" : "genre:" + g);
            ArrayNode ids = row.putArray("items");
            for (PopularItems.Entry e : lists.get(g).entries) {
                if (ids.size() == Rules.ROW_SIZE) {
                    break;
                }
                if (!p.seen.contains(e.movieId)) {
                    ids.add(e.movieId);
                }
            }
        }
        return new Outputs(rec.toString(), car.toString());
    }

    private static ObjectNode header(String userId, UserProfile p) {
        return Json.MAPPER.createObjectNode()
                .put("user_id", userId)
                .put("version", p.version)
                .put("as_of", p.lastTs)
                .put("generated_by", "kafka-streams-peer");
    }

    private static PopularItems orEmpty(PopularItems l) {
        return l == null ? new PopularItems() : l;
    }
}
