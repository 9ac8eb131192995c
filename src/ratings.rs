//! MovieLens ratings files read through Arrow: ml-latest-small / ML-20M / ML-25M
//! `ratings.csv`, ML-100K `u.data` (and its `uN.base`/`uN.test` splits), ML-1M
//! `ratings.dat`. Used by the demo's replay (and by training and evaluation).

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema};

use crate::catalog::CatalogError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rating {
    pub user_id: u32,
    pub movie_id: u32,
    pub rating: f64,
    /// Event time in milliseconds.
    pub ts_ms: i64,
}

/// Loads the ratings file found in a MovieLens directory.
pub fn load_dir(dir: &Path) -> Result<Vec<Rating>, CatalogError> {
    for name in ["ratings.csv", "u.data", "ratings.dat"] {
        let p = dir.join(name);
        if p.exists() {
            return load(&p);
        }
    }
    Err(CatalogError::Format {
        path: dir.into(),
        detail: "no ratings.csv, u.data or ratings.dat".into(),
    })
}

/// Loads one ratings file; the layout is chosen by file name.
pub fn load(path: &Path) -> Result<Vec<Rating>, CatalogError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let text = std::fs::read(path).map_err(|source| CatalogError::Io {
        path: path.into(),
        source,
    })?;
    let (bytes, delimiter, header) = if name.ends_with(".csv") {
        (text, b',', true)
    } else if name.ends_with(".dat") {
        let s = String::from_utf8_lossy(&text).replace("::", "\t");
        (s.into_bytes(), b'\t', false)
    } else {
        (text, b'\t', false)
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("user", DataType::Int64, false),
        Field::new("item", DataType::Int64, false),
        Field::new("rating", DataType::Float64, false),
        Field::new("ts", DataType::Int64, false),
    ]));
    let reader = arrow::csv::ReaderBuilder::new(schema)
        .with_header(header)
        .with_delimiter(delimiter)
        .with_batch_size(65_536)
        .build(Cursor::new(bytes))
        .map_err(|source| CatalogError::Arrow {
            path: path.into(),
            source,
        })?;
    let mut out = Vec::new();
    for batch in reader {
        let b = batch.map_err(|source| CatalogError::Arrow {
            path: path.into(),
            source,
        })?;
        let users = b.column(0).as_primitive::<Int64Type>();
        let items = b.column(1).as_primitive::<Int64Type>();
        let ratings = b.column(2).as_primitive::<Float64Type>();
        let ts = b.column(3).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            if users.is_null(i) || items.is_null(i) {
                continue;
            }
            out.push(Rating {
                user_id: users.value(i) as u32,
                movie_id: items.value(i) as u32,
                rating: ratings.value(i),
                ts_ms: ts.value(i) * 1000,
            });
        }
    }
    Ok(out)
}

/// Reads an interaction topic dump (Parquet or Arrow IPC) with the columns of
/// the interaction schema: `user_id` (string or integer), `movie_id`, `ts`
/// (epoch milliseconds), optional `rating` and optional `type`. Negative
/// feedback (`dislike`, `skip`) is left out: training treats every row as a
/// positive interaction.
pub fn load_dump(path: &Path) -> Result<Vec<crate::ncf::data::RawInteraction>, CatalogError> {
    use arrow::compute::cast;
    let batches = if path.to_string_lossy().ends_with(".parquet") {
        crate::catalog::read_parquet_batches(path)?
    } else {
        crate::catalog::read_ipc_batches(path)?
    };
    let format = |detail: String| CatalogError::Format {
        path: path.into(),
        detail,
    };
    let arrow_err = |source| CatalogError::Arrow {
        path: path.into(),
        source,
    };
    let mut out = Vec::new();
    for b in &batches {
        let column =
            |name: &str, to: &DataType| -> Result<Option<arrow::array::ArrayRef>, CatalogError> {
                match b.column_by_name(name) {
                    Some(c) => cast(c, to).map(Some).map_err(arrow_err),
                    None => Ok(None),
                }
            };
        let required = |name: &str, to: &DataType| {
            column(name, to)?.ok_or_else(|| format(format!("missing column `{name}`")))
        };
        let users = required("user_id", &DataType::Utf8)?;
        let movies = required("movie_id", &DataType::Int64)?;
        let ts = required("ts", &DataType::Int64)?;
        let rating = column("rating", &DataType::Float64)?;
        let kind = column("type", &DataType::Utf8)?;
        let (users, movies, ts) = (
            users.as_string::<i32>(),
            movies.as_primitive::<Int64Type>(),
            ts.as_primitive::<Int64Type>(),
        );
        for i in 0..b.num_rows() {
            if users.is_null(i) || movies.is_null(i) || ts.is_null(i) {
                return Err(format(format!(
                    "row {i}: user_id, movie_id and ts are required"
                )));
            }
            if let Some(k) = &kind {
                let k = k.as_string::<i32>();
                if k.is_valid(i) && matches!(k.value(i), "dislike" | "skip") {
                    continue;
                }
            }
            let movie = u32::try_from(movies.value(i))
                .map_err(|_| format(format!("row {i}: movie_id out of range")))?;
            out.push(crate::ncf::data::RawInteraction {
                user: users.value(i).to_string(),
                movie_id: movie,
                rating: rating
                    .as_ref()
                    .map(|r| r.as_primitive::<Float64Type>())
                    .filter(|r| r.is_valid(i))
                    .map_or(0.0, |r| r.value(i) as f32),
                ts: ts.value(i),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_three_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("ratings.csv");
        std::fs::write(
            &csv,
            "userId,movieId,rating,timestamp\r\n1,31,2.5,1260759144\r\n",
        )
        .unwrap();
        let udata = dir.path().join("u.data");
        std::fs::write(&udata, "196\t242\t3\t881250949\n").unwrap();
        let dat = dir.path().join("ratings.dat");
        std::fs::write(&dat, "1::1193::5::978300760\n").unwrap();
        assert_eq!(
            load(&csv).unwrap()[0],
            Rating {
                user_id: 1,
                movie_id: 31,
                rating: 2.5,
                ts_ms: 1_260_759_144_000
            }
        );
        assert_eq!(load(&udata).unwrap()[0].movie_id, 242);
        assert_eq!(load(&dat).unwrap()[0].rating, 5.0);
    }

    #[test]
    fn reads_an_interaction_dump_from_parquet() {
        use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dump.parquet");
        let batch = RecordBatch::try_from_iter([
            (
                "user_id",
                Arc::new(StringArray::from(vec!["u1", "u2", "u1"])) as _,
            ),
            (
                "movie_id",
                Arc::new(Int64Array::from(vec![10, 20, 30])) as _,
            ),
            ("ts", Arc::new(Int64Array::from(vec![1, 2, 3])) as _),
            (
                "rating",
                Arc::new(Float64Array::from(vec![Some(4.5), None, None])) as _,
            ),
            (
                "type",
                Arc::new(StringArray::from(vec!["rate", "play", "skip"])) as _,
            ),
        ])
        .unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&path).unwrap(),
            batch.schema(),
            None,
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let rows = load_dump(&path).unwrap();
        assert_eq!(rows.len(), 2, "the skip is not a positive");
        assert_eq!(
            (rows[0].user.as_str(), rows[0].movie_id, rows[0].rating),
            ("u1", 10, 4.5)
        );
        assert_eq!(
            (rows[1].user.as_str(), rows[1].rating, rows[1].ts),
            ("u2", 0.0, 2)
        );
    }
}
