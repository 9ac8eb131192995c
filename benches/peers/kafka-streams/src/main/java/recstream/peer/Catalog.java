package recstream.peer;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/** Movie id -> genres, read from the files the engine's `catalog::load` reads. */
final class Catalog {
    private static final String[] ML100K_GENRES = {
        "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
        "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
        "War", "Western",
    };

    final Map<Integer, List<String>> genres;

    Catalog(Map<Integer, List<String>> genres) {
        this.genres = genres;
    }

    List<String> genresOf(int movieId) {
        return genres.getOrDefault(movieId, List.of());
    }

    boolean contains(int movieId) {
        return genres.containsKey(movieId);
    }

    static Catalog load(Path path) throws IOException {
        String name = path.getFileName().toString();
        Map<Integer, List<String>> genres = new HashMap<>();
        switch (name) {
            case "u.item":
                for (String line : Files.readAllLines(path, StandardCharsets.ISO_8859_1)) {
                    String[] f = line.split("\\|", -1);
                    if (f.length < 5 + ML100K_GENRES.length) {
                        continue;
                    }
                    List<String> gs = new ArrayList<>();
                    for (int i = 0; i < ML100K_GENRES.length; i++) {
                        if (f[5 + i].equals("1") && i > 0) {
                            gs.add(ML100K_GENRES[i]);
                        }
                    }
                    genres.put(Integer.parseInt(f[0]), gs);
                }
                break;
            case "movies.dat":
                for (String line : Files.readAllLines(path, StandardCharsets.ISO_8859_1)) {
                    String[] f = line.split("::", -1);
                    if (f.length == 3) {
                        genres.put(Integer.parseInt(f[0]), split(f[2]));
                    }
                }
                break;
            case "movies.csv":
                List<String> lines = Files.readAllLines(path, StandardCharsets.UTF_8);
                for (String line : lines.subList(1, lines.size())) {
                    // movieId,title,genres: the title may be quoted and hold commas.
                    int first = line.indexOf(',');
                    int last = line.lastIndexOf(',');
                    if (first > 0 && last > first) {
                        genres.put(Integer.parseInt(line.substring(0, first)), split(line.substring(last + 1).trim()));
                    }
                }
                break;
            default:
                throw new IOException("catalog: unknown format " + name + "; expected movies.csv, u.item or movies.dat");
        }
        return new Catalog(genres);
    }

    private static List<String> split(String field) {
        List<String> gs = new ArrayList<>();
        for (String g : field.split("\\|")) {
            if (!g.isEmpty() && !g.equals("unknown") && !g.equals("(no genres listed)")) {
                gs.add(g);
            }
        }
        return gs;
    }
}
