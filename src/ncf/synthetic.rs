//! Synthetic interactions over a catalog, for tests, the demo's model and
//! benchmarks (MovieLens may not be redistributed). Each user loves two genres:
//! most of their interactions are highly rated movies of those genres, the
//! rest are random movies with low ratings.

use super::data::RawInteraction;
use crate::catalog::Catalog;
use crate::rng::Rng;

pub fn interactions(
    catalog: &Catalog,
    users: usize,
    per_user: usize,
    seed: u64,
) -> Vec<RawInteraction> {
    let mut rng = Rng::new(seed);
    let ids: Vec<u32> = catalog.ids().to_vec();
    let genres = catalog.genre_count().max(1) as u64;
    let mut out = Vec::with_capacity(users * per_user);
    for u in 0..users {
        let loved = [
            (rng.next_u64() % genres) as u8,
            (rng.next_u64() % genres) as u8,
        ];
        let liked: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| {
                catalog
                    .get(*id)
                    .is_some_and(|m| loved.iter().any(|g| m.genres.contains(*g)))
            })
            .collect();
        let mut ts = 1_700_000_000_000 + u as i64 * 1000;
        for _ in 0..per_user {
            ts += 60_000 + (rng.next_u64() % 600_000) as i64;
            let (movie_id, rating) = if !liked.is_empty() && rng.unit() < 0.8 {
                (
                    liked[(rng.next_u64() % liked.len() as u64) as usize],
                    4.0 + (rng.next_u64() % 2) as f32,
                )
            } else {
                (
                    ids[(rng.next_u64() % ids.len() as u64) as usize],
                    1.0 + (rng.next_u64() % 3) as f32,
                )
            };
            out.push(RawInteraction {
                user: format!("synthetic-{u}"),
                movie_id,
                rating,
                ts,
            });
        }
    }
    out
}
