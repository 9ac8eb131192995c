//! The movie catalog: titles, genres, years, external ids and tags.
//!
//! Files are read through Arrow: the MovieLens formats (ml-latest-small
//! `movies.csv` with `links.csv`/`tags.csv` beside it, ML-100K `u.item`, ML-1M
//! `movies.dat`), our canonical CSV, Parquet and Arrow IPC. Updates also arrive
//! as JSON records on the catalog topic (`schemas/catalog.v1.schema.json`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use serde::{Deserialize, Serialize};

/// At most 64 distinct genres: a movie's genres are a bit set in a `u64`.
pub const MAX_GENRES: usize = 64;
const MAX_TAGS_PER_MOVIE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read catalog file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot decode catalog file {path}: {source}")]
    Arrow {
        path: PathBuf,
        source: arrow::error::ArrowError,
    },
    #[error("cannot decode Parquet catalog {path}: {source}")]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("catalog file {path}: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("catalog record: {0}")]
    Record(String),
}

/// Hashes a `u32` id with one multiply: ids are not attacker-chosen keys, and
/// SipHash dominated candidate scoring.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ *b as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u32(&mut self, id: u32) {
        self.0 = (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map keyed by movie id.
pub type IdMap<V> = HashMap<u32, V, std::hash::BuildHasherDefault<IdHasher>>;

/// A set of genre indices into [`Catalog::genre_name`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GenreSet(pub u64);

impl GenreSet {
    pub fn contains(self, genre: u8) -> bool {
        self.0 & (1u64 << genre) != 0
    }
    pub fn insert(&mut self, genre: u8) {
        self.0 |= 1u64 << genre;
    }
    pub fn len(self) -> u32 {
        self.0.count_ones()
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The genres in increasing order (one step per genre, not per bit).
    pub fn iter(self) -> impl Iterator<Item = u8> {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            if rest == 0 {
                return None;
            }
            let g = rest.trailing_zeros() as u8;
            rest &= rest - 1;
            Some(g)
        })
    }
    /// Jaccard similarity of two genre sets (0 when both are empty).
    pub fn jaccard(self, other: GenreSet) -> f64 {
        let union = (self.0 | other.0).count_ones();
        jaccard_of_counts((self.0 & other.0).count_ones(), union)
    }
}

/// The Jaccard similarity of two sets that share `shared` of their `union`
/// elements (0 when both are empty); `shared <= union <= 64`.
pub fn jaccard_of_counts(shared: u32, union: u32) -> f64 {
    debug_assert!(shared <= union && union as usize <= MAX_GENRES);
    JACCARD[union as usize * (MAX_GENRES + 1) + shared as usize]
}

/// `shared / union` for every pair of genre counts, at `union * 65 + shared`
/// (0 when both are 0), computed by the same division at compile time. A
/// recompute takes a Jaccard for each of ≈ 1,750 candidate–seed pairs, and a
/// division's latency was a tenth of the recompute.
static JACCARD: [f64; (MAX_GENRES + 1) * (MAX_GENRES + 1)] = jaccard_table();

const fn jaccard_table() -> [f64; (MAX_GENRES + 1) * (MAX_GENRES + 1)] {
    let mut table = [0.0; (MAX_GENRES + 1) * (MAX_GENRES + 1)];
    let mut union = 1;
    while union <= MAX_GENRES {
        let mut shared = 0;
        while shared <= union {
            table[union * (MAX_GENRES + 1) + shared] = shared as f64 / union as f64;
            shared += 1;
        }
        union += 1;
    }
    table
}

#[derive(Debug, Clone, PartialEq)]
pub struct Movie {
    pub id: u32,
    /// Shared: every published item carries it.
    pub title: Arc<str>,
    pub year: Option<u16>,
    pub genres: GenreSet,
    pub tmdb_id: Option<u32>,
    pub imdb_id: Option<String>,
    /// Interned tag ids, sorted, at most [`MAX_TAGS_PER_MOVIE`].
    pub tags: Vec<u32>,
    /// Names of `genres`, in genre-index order, shared like `title`.
    pub genre_names: Arc<[Arc<str>]>,
}

impl Movie {
    pub fn content_key(&self) -> ContentKey {
        ContentKey {
            genres: self.genres,
            genre_count: self.genres.len() as u8,
            year: self.year,
            tagged: !self.tags.is_empty(),
        }
    }
}

/// What content similarity reads of a movie besides its tag ids. The
/// catalog keeps these densely by position (16 bytes each), so a recompute
/// comparing a few hundred candidates with its seeds reads a compact table
/// rather than each candidate's whole record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentKey {
    pub genres: GenreSet,
    /// How many genres: a Jaccard then needs one bit count, not two (a
    /// build for plain x86-64, without POPCNT, counts bits in software).
    pub genre_count: u8,
    pub year: Option<u16>,
    /// Whether the movie has tags (then the tag ids are in its record).
    pub tagged: bool,
}

/// The JSON record on the catalog topic, keyed by movie id. A null value deletes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogRecord {
    pub movie_id: u32,
    pub title: String,
    #[serde(default)]
    pub genres: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub year: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmdb_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imdb_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// Decodes and checks a catalog-topic payload.
pub fn parse_record(payload: &[u8]) -> Result<CatalogRecord, String> {
    let record: CatalogRecord =
        serde_json::from_slice(payload).map_err(|e| format!("invalid catalog record: {e}"))?;
    if record.movie_id == 0 || record.title.trim().is_empty() {
        return Err("a catalog record needs movie_id >= 1 and a non-empty title".into());
    }
    Ok(record)
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// The movies, densely: a movie's position indexes per-item tables of a
    /// recompute (no hash lookup per candidate). A removal moves the last
    /// movie into the freed place, so positions hold until the catalog
    /// changes, as everything derived from it does.
    movies: Vec<Movie>,
    /// Each movie's [`ContentKey`], by the same positions.
    keys: Vec<ContentKey>,
    positions: IdMap<u32>,
    genre_names: Vec<Arc<str>>,
    genre_ids: HashMap<String, u8>,
    tag_ids: HashMap<String, u32>,
    /// Sorted movie ids, for deterministic scans.
    ids: Vec<u32>,
}

impl Catalog {
    pub fn len(&self) -> usize {
        self.movies.len()
    }
    pub fn is_empty(&self) -> bool {
        self.movies.is_empty()
    }
    pub fn get(&self, id: u32) -> Option<&Movie> {
        self.position(id).map(|p| self.at(p))
    }
    pub fn contains(&self, id: u32) -> bool {
        self.positions.contains_key(&id)
    }
    /// Where the movie is in the dense order (`0..len()`).
    pub fn position(&self, id: u32) -> Option<u32> {
        self.positions.get(&id).copied()
    }
    /// The movie at a [`Catalog::position`]; panics beyond `len()`.
    pub fn at(&self, position: u32) -> &Movie {
        &self.movies[position as usize]
    }
    /// The content key of the movie at a [`Catalog::position`].
    pub fn key_at(&self, position: u32) -> ContentKey {
        self.keys[position as usize]
    }
    /// Movie ids in ascending order.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
    pub fn movies(&self) -> impl Iterator<Item = &Movie> {
        self.ids.iter().filter_map(|id| self.get(*id))
    }
    pub fn genre_count(&self) -> usize {
        self.genre_names.len()
    }
    pub fn genre_name(&self, genre: u8) -> &str {
        self.genre_names
            .get(genre as usize)
            .map(|g| &**g)
            .unwrap_or("Unknown")
    }
    pub fn genre_id(&self, name: &str) -> Option<u8> {
        self.genre_ids.get(&normalize_genre(name)?).copied()
    }
    pub fn genre_names(&self, set: GenreSet) -> Vec<String> {
        set.iter().map(|g| self.genre_name(g).to_string()).collect()
    }

    /// Genre names in id order: user state stores genre weights by id, so this
    /// vocabulary is persisted with the state.
    pub fn genre_vocabulary(&self) -> Vec<String> {
        self.genre_names.iter().map(|g| g.to_string()).collect()
    }

    /// Renumbers genres to follow a persisted vocabulary (its ids keep their
    /// meaning; genres it lacks are appended), whatever order the catalog
    /// sources listed them in.
    pub fn adopt_genre_vocabulary(&mut self, vocabulary: &[String]) -> Result<(), CatalogError> {
        let mut names: Vec<Arc<str>> = vocabulary.iter().map(|g| Arc::from(g.as_str())).collect();
        for g in &self.genre_names {
            if !names.contains(g) {
                names.push(g.clone());
            }
        }
        if names.len() > MAX_GENRES {
            return Err(CatalogError::Record(format!(
                "{} distinct genres exceed the limit of {MAX_GENRES}",
                names.len()
            )));
        }
        let new_id: Vec<u8> = self
            .genre_names
            .iter()
            .map(|g| names.iter().position(|n| n == g).expect("appended above") as u8)
            .collect();
        for (movie, key) in self.movies.iter_mut().zip(&mut self.keys) {
            let mut remapped = GenreSet::default();
            for g in movie.genres.iter() {
                remapped.insert(new_id[g as usize]);
            }
            movie.genres = remapped;
            movie.genre_names = remapped.iter().map(|g| names[g as usize].clone()).collect();
            *key = movie.content_key();
        }
        self.genre_ids = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), i as u8))
            .collect();
        self.genre_names = names;
        Ok(())
    }

    /// Inserts or replaces a movie from a catalog-topic record.
    pub fn upsert(&mut self, record: CatalogRecord) -> Result<(), CatalogError> {
        if record.movie_id == 0 || record.title.trim().is_empty() {
            return Err(CatalogError::Record(
                "movie_id must be >= 1 and title non-empty".into(),
            ));
        }
        let mut genres = GenreSet::default();
        for name in &record.genres {
            if let Some(g) = self.intern_genre(name)? {
                genres.insert(g);
            }
        }
        let mut tags: Vec<u32> = record
            .tags
            .iter()
            .filter_map(|t| self.intern_tag(t))
            .collect();
        tags.sort_unstable();
        tags.dedup();
        tags.truncate(MAX_TAGS_PER_MOVIE);
        let movie = Movie {
            id: record.movie_id,
            title: Arc::from(record.title.trim()),
            genre_names: genres
                .iter()
                .map(|g| self.genre_names[g as usize].clone())
                .collect(),
            year: record.year,
            genres,
            tmdb_id: record.tmdb_id,
            imdb_id: record.imdb_id,
            tags,
        };
        match self.positions.get(&movie.id) {
            Some(&p) => {
                self.keys[p as usize] = movie.content_key();
                self.movies[p as usize] = movie;
            }
            None => {
                self.positions.insert(movie.id, self.movies.len() as u32);
                self.keys.push(movie.content_key());
                self.movies.push(movie);
                let pos = self.ids.binary_search(&record.movie_id).unwrap_err();
                self.ids.insert(pos, record.movie_id);
            }
        }
        Ok(())
    }

    pub fn remove(&mut self, id: u32) {
        if let Some(p) = self.positions.remove(&id) {
            self.movies.swap_remove(p as usize);
            self.keys.swap_remove(p as usize);
            if let Some(moved) = self.movies.get(p as usize) {
                self.positions.insert(moved.id, p);
            }
            if let Ok(pos) = self.ids.binary_search(&id) {
                self.ids.remove(pos);
            }
        }
    }

    /// The catalog-topic record for a movie (for publishing a catalog).
    pub fn record(&self, id: u32) -> Option<CatalogRecord> {
        let m = self.get(id)?;
        let tag_names: HashMap<u32, &str> =
            self.tag_ids.iter().map(|(k, v)| (*v, k.as_str())).collect();
        Some(CatalogRecord {
            movie_id: m.id,
            title: m.title.to_string(),
            genres: self.genre_names(m.genres),
            year: m.year,
            tmdb_id: m.tmdb_id,
            imdb_id: m.imdb_id.clone(),
            tags: m
                .tags
                .iter()
                .filter_map(|t| tag_names.get(t).map(|s| s.to_string()))
                .collect(),
        })
    }

    fn intern_genre(&mut self, name: &str) -> Result<Option<u8>, CatalogError> {
        let Some(name) = normalize_genre(name) else {
            return Ok(None);
        };
        if let Some(id) = self.genre_ids.get(&name) {
            return Ok(Some(*id));
        }
        if self.genre_names.len() >= MAX_GENRES {
            return Err(CatalogError::Record(format!(
                "genre {name:?} exceeds the limit of {MAX_GENRES} distinct genres"
            )));
        }
        let id = self.genre_names.len() as u8;
        self.genre_names.push(Arc::from(name.as_str()));
        self.genre_ids.insert(name, id);
        Ok(Some(id))
    }

    fn intern_tag(&mut self, tag: &str) -> Option<u32> {
        let tag = tag.trim().to_lowercase();
        if tag.is_empty() || tag.len() > 64 {
            return None;
        }
        let next = self.tag_ids.len() as u32;
        Some(*self.tag_ids.entry(tag).or_insert(next))
    }
}

/// Canonical genre names: MovieLens spells one genre two ways, and uses
/// placeholders for "no genre".
fn normalize_genre(name: &str) -> Option<String> {
    let name = name.trim();
    match name {
        "" | "unknown" | "(no genres listed)" => None,
        "Children's" => Some("Children".into()),
        _ => Some(name.to_string()),
    }
}

/// Extracts the trailing "(1995)" year of a MovieLens title.
pub fn year_from_title(title: &str) -> Option<u16> {
    let t = title.trim_end();
    let open = t.rfind('(')?;
    let inner = t[open + 1..].strip_suffix(')')?;
    let inner = inner.split(['-', '–']).next()?;
    let year: u16 = inner.trim().parse().ok()?;
    (1870..=2100).contains(&year).then_some(year)
}

/// Loads a catalog file, choosing the reader by file name.
pub fn load(path: &Path) -> Result<Catalog, CatalogError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut records = match (name.as_str(), ext.as_str()) {
        ("u.item", _) => read_ml100k(path)?,
        ("movies.dat", _) => read_ml1m(path)?,
        ("movies.csv", _) => read_ml_latest(path)?,
        (_, "csv") => read_canonical_csv(path)?,
        (_, "parquet") => records_from_batches(path, &read_parquet_batches(path)?)?,
        (_, "arrow" | "arrows" | "ipc" | "feather") => {
            records_from_batches(path, &read_ipc_batches(path)?)?
        }
        _ => {
            return Err(CatalogError::Format {
                path: path.into(),
                detail: "unknown catalog format; expected movies.csv, u.item, movies.dat, \
                         a canonical .csv, .parquet or .arrow"
                    .into(),
            })
        }
    };
    records.sort_by_key(|r| r.movie_id);
    let mut catalog = Catalog::default();
    for r in records {
        catalog.upsert(r)?;
    }
    if catalog.is_empty() {
        return Err(CatalogError::Format {
            path: path.into(),
            detail: "no movies in file".into(),
        });
    }
    Ok(catalog)
}

fn open(path: &Path) -> Result<File, CatalogError> {
    File::open(path).map_err(|source| CatalogError::Io {
        path: path.into(),
        source,
    })
}

/// Reads a file as text; MovieLens' older files are ISO-8859-1, which maps
/// byte-for-byte to the first 256 Unicode code points.
fn read_text(path: &Path) -> Result<String, CatalogError> {
    let mut bytes = Vec::new();
    open(path)?
        .read_to_end(&mut bytes)
        .map_err(|source| CatalogError::Io {
            path: path.into(),
            source,
        })?;
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => e.into_bytes().iter().map(|&b| b as char).collect(),
    })
}

/// Reads delimited text into all-Utf8 record batches.
fn read_delimited(
    path: &Path,
    text: String,
    columns: &[&str],
    header: bool,
    delimiter: u8,
    quote: u8,
) -> Result<Vec<RecordBatch>, CatalogError> {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|c| Field::new(*c, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let reader = arrow::csv::ReaderBuilder::new(schema)
        .with_header(header)
        .with_delimiter(delimiter)
        .with_quote(quote)
        .with_batch_size(8192)
        .build(Cursor::new(text.into_bytes()))
        .map_err(|source| CatalogError::Arrow {
            path: path.into(),
            source,
        })?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CatalogError::Arrow {
            path: path.into(),
            source,
        })
}

fn utf8<'a>(batch: &'a RecordBatch, name: &str) -> Option<&'a StringArray> {
    batch.column_by_name(name)?.as_string_opt::<i32>()
}

fn cell(col: Option<&StringArray>, row: usize) -> Option<&str> {
    let col = col?;
    (!col.is_null(row))
        .then(|| col.value(row).trim())
        .filter(|s| !s.is_empty())
}

fn parse_id(path: &Path, text: Option<&str>, what: &str) -> Result<u32, CatalogError> {
    text.and_then(|t| t.parse().ok())
        .ok_or_else(|| CatalogError::Format {
            path: path.into(),
            detail: format!("bad {what}: {text:?}"),
        })
}

fn read_ml_latest(path: &Path) -> Result<Vec<CatalogRecord>, CatalogError> {
    let batches = read_delimited(
        path,
        read_text(path)?,
        &["movieId", "title", "genres"],
        true,
        b',',
        b'"',
    )?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let links = read_links(&dir.join("links.csv"))?;
    let mut tags = read_tags(&dir.join("tags.csv"))?;
    let mut out = Vec::new();
    for b in &batches {
        let (ids, titles, genres) = (utf8(b, "movieId"), utf8(b, "title"), utf8(b, "genres"));
        for row in 0..b.num_rows() {
            let id = parse_id(path, cell(ids, row), "movieId")?;
            let title = cell(titles, row).unwrap_or_default().to_string();
            let (imdb_id, tmdb_id) = links.get(&id).cloned().unwrap_or_default();
            out.push(CatalogRecord {
                movie_id: id,
                year: year_from_title(&title),
                title,
                genres: split_genres(cell(genres, row)),
                tmdb_id,
                imdb_id,
                tags: tags.remove(&id).unwrap_or_default(),
            });
        }
    }
    Ok(out)
}

type Links = HashMap<u32, (Option<String>, Option<u32>)>;

fn read_links(path: &Path) -> Result<Links, CatalogError> {
    if !path.exists() {
        return Ok(HashMap::new());
    }
    let batches = read_delimited(
        path,
        read_text(path)?,
        &["movieId", "imdbId", "tmdbId"],
        true,
        b',',
        b'"',
    )?;
    let mut links = HashMap::new();
    for b in &batches {
        let (ids, imdb, tmdb) = (utf8(b, "movieId"), utf8(b, "imdbId"), utf8(b, "tmdbId"));
        for row in 0..b.num_rows() {
            let id = parse_id(path, cell(ids, row), "movieId")?;
            let imdb = cell(imdb, row).map(|s| format!("tt{s}"));
            let tmdb = cell(tmdb, row).and_then(|s| s.parse().ok());
            links.insert(id, (imdb, tmdb));
        }
    }
    Ok(links)
}

fn read_tags(path: &Path) -> Result<HashMap<u32, Vec<String>>, CatalogError> {
    if !path.exists() {
        return Ok(HashMap::new());
    }
    let batches = read_delimited(
        path,
        read_text(path)?,
        &["userId", "movieId", "tag", "timestamp"],
        true,
        b',',
        b'"',
    )?;
    let mut tags: HashMap<u32, Vec<String>> = HashMap::new();
    for b in &batches {
        let (ids, tag) = (utf8(b, "movieId"), utf8(b, "tag"));
        for row in 0..b.num_rows() {
            if let (Some(id), Some(t)) =
                (cell(ids, row).and_then(|s| s.parse().ok()), cell(tag, row))
            {
                tags.entry(id).or_default().push(t.to_string());
            }
        }
    }
    Ok(tags)
}

/// The ML-100K genre columns, in file order (its `u.genre`).
const ML100K_GENRES: [&str; 19] = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
];

fn read_ml100k(path: &Path) -> Result<Vec<CatalogRecord>, CatalogError> {
    let mut columns = vec!["id", "title", "release", "video", "url"];
    columns.extend(ML100K_GENRES);
    // Titles contain quotes; the file has no quoting, so use a byte that never occurs.
    let batches = read_delimited(path, read_text(path)?, &columns, false, b'|', 0x1e)?;
    let mut out = Vec::new();
    for b in &batches {
        for row in 0..b.num_rows() {
            let id = parse_id(path, cell(utf8(b, "id"), row), "movie id")?;
            let title = cell(utf8(b, "title"), row).unwrap_or_default().to_string();
            let genres = ML100K_GENRES
                .iter()
                .filter(|g| cell(utf8(b, g), row) == Some("1"))
                .map(|g| g.to_string())
                .collect();
            let year = year_from_title(&title).or_else(|| {
                cell(utf8(b, "release"), row)?
                    .rsplit('-')
                    .next()?
                    .parse()
                    .ok()
            });
            out.push(CatalogRecord {
                movie_id: id,
                title,
                genres,
                year,
                tmdb_id: None,
                imdb_id: None,
                tags: Vec::new(),
            });
        }
    }
    Ok(out)
}

fn read_ml1m(path: &Path) -> Result<Vec<CatalogRecord>, CatalogError> {
    // `::` is not a single-byte delimiter; map it to the unit separator first.
    let text = read_text(path)?.replace("::", "\u{1f}");
    let batches = read_delimited(path, text, &["id", "title", "genres"], false, 0x1f, 0x1e)?;
    let mut out = Vec::new();
    for b in &batches {
        for row in 0..b.num_rows() {
            let id = parse_id(path, cell(utf8(b, "id"), row), "movie id")?;
            let title = cell(utf8(b, "title"), row).unwrap_or_default().to_string();
            out.push(CatalogRecord {
                movie_id: id,
                year: year_from_title(&title),
                title,
                genres: split_genres(cell(utf8(b, "genres"), row)),
                tmdb_id: None,
                imdb_id: None,
                tags: Vec::new(),
            });
        }
    }
    Ok(out)
}

/// Our canonical CSV: `movie_id,title,genres,year,tmdb_id,imdb_id` with a header,
/// genres separated by `|`.
fn read_canonical_csv(path: &Path) -> Result<Vec<CatalogRecord>, CatalogError> {
    let batches = read_delimited(
        path,
        read_text(path)?,
        &["movie_id", "title", "genres", "year", "tmdb_id", "imdb_id"],
        true,
        b',',
        b'"',
    )?;
    records_from_batches(path, &batches)
}

/// Reads every record batch of a Parquet file.
pub(crate) fn read_parquet_batches(path: &Path) -> Result<Vec<RecordBatch>, CatalogError> {
    let file = open(path)?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|source| CatalogError::Parquet {
            path: path.into(),
            source,
        })?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CatalogError::Arrow {
            path: path.into(),
            source,
        })
}

/// Reads every record batch of an Arrow IPC file or stream.
pub(crate) fn read_ipc_batches(path: &Path) -> Result<Vec<RecordBatch>, CatalogError> {
    let arrow_err = |source| CatalogError::Arrow {
        path: path.into(),
        source,
    };
    let mut file = open(path)?;
    let mut magic = [0u8; 6];
    let is_file_format = file.read_exact(&mut magic).is_ok() && &magic == b"ARROW1";
    let file = open(path)?;
    if is_file_format {
        arrow::ipc::reader::FileReader::try_new(file, None)
            .map_err(arrow_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(arrow_err)
    } else {
        arrow::ipc::reader::StreamReader::try_new(file, None)
            .map_err(arrow_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(arrow_err)
    }
}

/// Converts batches with the canonical column names (any integer or string types;
/// `genres` as a `|`-separated string or a list of strings) into records.
fn records_from_batches(
    path: &Path,
    batches: &[RecordBatch],
) -> Result<Vec<CatalogRecord>, CatalogError> {
    let mut out = Vec::new();
    for b in batches {
        let text_col = |name: &str| -> Result<Option<ArrayRef>, CatalogError> {
            match b.column_by_name(name) {
                None => Ok(None),
                // Lists (of any string type) become List<Utf8>.
                Some(c) if matches!(c.data_type(), DataType::List(_) | DataType::LargeList(_)) => {
                    let utf8_list =
                        DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
                    arrow::compute::cast(c, &utf8_list)
                        .map(Some)
                        .map_err(|source| CatalogError::Arrow {
                            path: path.into(),
                            source,
                        })
                }
                Some(c) => arrow::compute::cast(c, &DataType::Utf8)
                    .map(Some)
                    .map_err(|source| CatalogError::Arrow {
                        path: path.into(),
                        source,
                    }),
            }
        };
        let ids = text_col("movie_id")?.ok_or_else(|| CatalogError::Format {
            path: path.into(),
            detail: "missing column movie_id".into(),
        })?;
        let titles = text_col("title")?;
        let genres = text_col("genres")?;
        let years = text_col("year")?;
        let tmdb = text_col("tmdb_id")?;
        let imdb = text_col("imdb_id")?;
        let s = |c: &Option<ArrayRef>| c.as_ref().and_then(|a| a.as_string_opt::<i32>().cloned());
        let (ids_s, titles_s, years_s, tmdb_s, imdb_s) =
            (s(&Some(ids)), s(&titles), s(&years), s(&tmdb), s(&imdb));
        for row in 0..b.num_rows() {
            let id = parse_id(path, cell(ids_s.as_ref(), row), "movie_id")?;
            let title = cell(titles_s.as_ref(), row).unwrap_or_default().to_string();
            let genre_list = match &genres {
                Some(g) if matches!(g.data_type(), DataType::List(_)) => {
                    let list = g.as_list::<i32>();
                    if list.is_null(row) {
                        Vec::new()
                    } else {
                        let values = list.value(row);
                        let values =
                            arrow::compute::cast(&values, &DataType::Utf8).map_err(|source| {
                                CatalogError::Arrow {
                                    path: path.into(),
                                    source,
                                }
                            })?;
                        let values = values.as_string::<i32>();
                        (0..values.len())
                            .filter(|i| !values.is_null(*i))
                            .map(|i| values.value(i).to_string())
                            .collect()
                    }
                }
                Some(g) => split_genres(cell(g.as_string_opt::<i32>(), row)),
                None => Vec::new(),
            };
            out.push(CatalogRecord {
                movie_id: id,
                year: cell(years_s.as_ref(), row)
                    .and_then(|y| y.parse().ok())
                    .or_else(|| year_from_title(&title)),
                title,
                genres: genre_list,
                tmdb_id: cell(tmdb_s.as_ref(), row).and_then(|t| t.parse().ok()),
                imdb_id: cell(imdb_s.as_ref(), row).map(str::to_string),
                tags: Vec::new(),
            });
        }
    }
    Ok(out)
}

fn split_genres(text: Option<&str>) -> Vec<String> {
    text.map(|t| t.split('|').map(str::to_string).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_jaccard_table_holds_every_quotient() {
        assert_eq!(jaccard_of_counts(0, 0).to_bits(), 0.0f64.to_bits());
        for union in 1..=MAX_GENRES as u32 {
            for shared in 0..=union {
                let want = shared as f64 / union as f64;
                assert_eq!(jaccard_of_counts(shared, union).to_bits(), want.to_bits());
            }
        }
    }

    #[test]
    fn jaccard_reads_like_the_division() {
        let mut rng = crate::rng::Rng::new(7);
        let mut pairs = vec![(0, 0), (u64::MAX, u64::MAX), (u64::MAX, 1), (0, 1 << 63)];
        pairs.extend((0..20_000).map(|i| {
            // Sparse sets as well as dense ones: a movie has a few genres.
            let sparse = |x: u64| x & rng_mask(i);
            let (a, b) = (rng.next_u64(), rng.next_u64());
            (sparse(a), sparse(b))
        }));
        for (a, b) in pairs {
            let union = (a | b).count_ones();
            let want = if union == 0 {
                0.0
            } else {
                (a & b).count_ones() as f64 / union as f64
            };
            let got = GenreSet(a).jaccard(GenreSet(b));
            assert_eq!(got.to_bits(), want.to_bits(), "{a:#x} {b:#x}");
        }
    }

    /// Every other draw keeps a few low bits only.
    fn rng_mask(i: usize) -> u64 {
        if i % 2 == 0 {
            0x3f_ffff
        } else {
            u64::MAX
        }
    }

    #[test]
    fn years_come_from_titles() {
        assert_eq!(year_from_title("Toy Story (1995)"), Some(1995));
        assert_eq!(year_from_title("Babylon 5 (1994-1998) "), Some(1994));
        assert_eq!(year_from_title("No year"), None);
    }

    #[test]
    fn reads_the_three_movielens_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let latest = dir.path().join("movies.csv");
        std::fs::write(
            &latest,
            "movieId,title,genres\r\n1,\"Toy Story, The (1995)\",Adventure|Children\r\n2,Heat (1995),(no genres listed)\r\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("links.csv"),
            "movieId,imdbId,tmdbId\r\n1,0114709,862\r\n2,0113277,\r\n",
        )
        .unwrap();
        let c = load(&latest).unwrap();
        assert_eq!(c.len(), 2);
        let toy = c.get(1).unwrap();
        assert_eq!(&*toy.title, "Toy Story, The (1995)");
        assert_eq!(toy.tmdb_id, Some(862));
        assert_eq!(toy.imdb_id.as_deref(), Some("tt0114709"));
        assert_eq!(c.genre_names(toy.genres), vec!["Adventure", "Children"]);
        assert!(c.get(2).unwrap().genres.is_empty());

        let item = dir.path().join("u.item");
        let mut f = File::create(&item).unwrap();
        // ISO-8859-1 bytes in the title.
        f.write_all(b"1|Caf\xe9 \"Noir\" (1995)|01-Jan-1995||http://x|0|0|0|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n").unwrap();
        let c = load(&item).unwrap();
        let m = c.get(1).unwrap();
        assert_eq!(&*m.title, "Café \"Noir\" (1995)");
        assert_eq!(c.genre_names(m.genres), vec!["Children", "Comedy"]);

        let dat = dir.path().join("movies.dat");
        std::fs::write(&dat, "3::Heat: Part \"2\" (1995)::Action|Crime\n").unwrap();
        let c = load(&dat).unwrap();
        assert_eq!(c.get(3).unwrap().year, Some(1995));
        assert_eq!(
            c.genre_names(c.get(3).unwrap().genres),
            vec!["Action", "Crime"]
        );
    }

    #[test]
    fn reads_arrow_ipc_and_parquet_with_list_genres() {
        use arrow::array::{ListBuilder, StringBuilder, UInt32Array};
        let mut genres = ListBuilder::new(StringBuilder::new());
        genres.values().append_value("Drama");
        genres.append(true);
        genres.values().append_value("Comedy");
        genres.values().append_value("Romance");
        genres.append(true);
        let batch = RecordBatch::try_from_iter(vec![
            (
                "movie_id",
                Arc::new(UInt32Array::from(vec![10, 11])) as ArrayRef,
            ),
            (
                "title",
                Arc::new(StringArray::from(vec!["A (2001)", "B"])) as ArrayRef,
            ),
            ("genres", Arc::new(genres.finish()) as ArrayRef),
            (
                "year",
                Arc::new(UInt32Array::from(vec![None, Some(1999)])) as ArrayRef,
            ),
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ipc = dir.path().join("catalog.arrow");
        let mut w =
            arrow::ipc::writer::FileWriter::try_new(File::create(&ipc).unwrap(), &batch.schema())
                .unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        let pq = dir.path().join("catalog.parquet");
        let mut w =
            parquet::arrow::ArrowWriter::try_new(File::create(&pq).unwrap(), batch.schema(), None)
                .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        for path in [ipc, pq] {
            let c = load(&path).unwrap();
            assert_eq!(c.get(10).unwrap().year, Some(2001));
            assert_eq!(c.get(11).unwrap().year, Some(1999));
            assert_eq!(
                c.genre_names(c.get(11).unwrap().genres),
                vec!["Comedy", "Romance"]
            );
        }
    }

    #[test]
    fn a_persisted_genre_vocabulary_keeps_ids_stable() {
        let record = |id: u32, genres: &[&str]| CatalogRecord {
            movie_id: id,
            title: format!("M{id}"),
            genres: genres.iter().map(|g| g.to_string()).collect(),
            year: None,
            tmdb_id: None,
            imdb_id: None,
            tags: vec![],
        };
        let mut first = Catalog::default();
        first.upsert(record(1, &["Drama", "Comedy"])).unwrap();
        let vocabulary = first.genre_vocabulary();
        // The same catalog listed in another order interns genres differently...
        let mut second = Catalog::default();
        second.upsert(record(2, &["Horror"])).unwrap();
        second.upsert(record(1, &["Comedy", "Drama"])).unwrap();
        assert_ne!(second.genre_id("Drama"), first.genre_id("Drama"));
        // ...until it adopts the persisted vocabulary.
        second.adopt_genre_vocabulary(&vocabulary).unwrap();
        for g in ["Drama", "Comedy"] {
            assert_eq!(second.genre_id(g), first.genre_id(g));
        }
        assert_eq!(second.genre_id("Horror"), Some(2));
        assert_eq!(
            second.genre_names(second.get(2).unwrap().genres),
            vec!["Horror"]
        );
        assert_eq!(&*second.get(1).unwrap().genre_names[0], "Drama");
        // The dense content keys follow the renumbering.
        for p in 0..second.len() as u32 {
            assert_eq!(second.key_at(p), second.at(p).content_key());
        }
        assert_eq!(
            second.key_at(second.position(2).unwrap()).genres,
            second.get(2).unwrap().genres
        );
    }

    #[test]
    fn upserts_and_removals_keep_ids_sorted() {
        let mut c = Catalog::default();
        for id in [5, 1, 3] {
            c.upsert(CatalogRecord {
                movie_id: id,
                title: format!("M{id}"),
                genres: vec!["Drama".into()],
                year: None,
                tmdb_id: None,
                imdb_id: None,
                tags: vec!["Dark".into(), "dark".into()],
            })
            .unwrap();
        }
        assert_eq!(c.ids(), &[1, 3, 5]);
        assert_eq!(c.get(1).unwrap().tags.len(), 1);
        c.remove(3);
        assert_eq!(c.ids(), &[1, 5]);
        assert_eq!(c.record(5).unwrap().tags, vec!["dark"]);
    }

    #[test]
    fn positions_stay_dense_and_exact_through_upserts_and_removals() {
        // Movies differ in genres, year and tags, so a content key left at
        // another movie's position would show.
        let record = |id: u32, title: &str| CatalogRecord {
            movie_id: id,
            title: title.into(),
            genres: ["Drama", "Comedy", "Horror"][..1 + (id as usize + title.len()) % 3]
                .iter()
                .map(|g| g.to_string())
                .collect(),
            year: (id % 2 == 0).then_some(1990 + id as u16 + title.len() as u16),
            tmdb_id: None,
            imdb_id: None,
            tags: (0..(id + title.len() as u32) % 3)
                .map(|t| format!("t{t}"))
                .collect(),
        };
        let mut c = Catalog::default();
        for id in [7, 2, 9, 4] {
            c.upsert(record(id, "first")).unwrap();
        }
        c.upsert(record(2, "renamed")).unwrap();
        c.remove(7);
        c.remove(42);
        c.upsert(record(11, "late")).unwrap();
        c.remove(11);
        assert_eq!(c.len(), 3);
        let mut positions: Vec<u32> = c.ids().iter().map(|id| c.position(*id).unwrap()).collect();
        for id in c.ids() {
            let p = c.position(*id).unwrap();
            assert_eq!(c.at(p).id, *id);
            assert_eq!(c.key_at(p), c.at(p).content_key());
            assert_eq!(c.get(*id).map(|m| m.id), Some(*id));
        }
        positions.sort_unstable();
        assert_eq!(positions, vec![0, 1, 2]);
        assert_eq!(&*c.get(2).unwrap().title, "renamed");
        assert!(c.position(7).is_none() && c.get(11).is_none());
    }
}
