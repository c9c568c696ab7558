//! Figures of a sample, as the tests and benches report them.

/// The `q` quantile (0 < q ≤ 1) of `sorted` by nearest rank: the smallest value with at least a `q` share
/// of the sample at or below it. `None` for an empty sample.
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(nearest_rank(&v, 0.99), Some(99));
        assert_eq!(nearest_rank(&v, 0.50), Some(50));
        assert_eq!(nearest_rank(&v, 1.0), Some(100));
        assert_eq!(nearest_rank(&v[..1], 0.99), Some(1));
        assert_eq!(nearest_rank::<u32>(&[], 0.99), None);
    }
}
