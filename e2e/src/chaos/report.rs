//! The soak's figures: latency (publish → first 2xx at the sink) per minute of publishing, and the closing
//! report.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Latencies of the ids first sent in one minute of the load.
#[derive(Clone, Debug, PartialEq)]
pub struct Minute {
    pub minute: u64,
    pub delivered: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// Per minute of first sends (since `t0`): how many ids of it were delivered, and the p50, p99 and max of
/// publish → first 2xx. Ids not delivered are not in it (they are in the account).
pub fn per_minute(
    t0: Instant,
    sent: &HashMap<String, Instant>,
    first_ok: &HashMap<String, Instant>,
) -> Vec<Minute> {
    let mut by_minute: BTreeMap<u64, Vec<Duration>> = BTreeMap::new();
    for (id, at) in sent {
        if let Some(ok) = first_ok.get(id) {
            let minute = at.saturating_duration_since(t0).as_secs() / 60;
            by_minute
                .entry(minute)
                .or_default()
                .push(ok.saturating_duration_since(*at));
        }
    }
    by_minute
        .into_iter()
        .map(|(minute, mut l)| {
            l.sort();
            Minute {
                minute,
                delivered: l.len(),
                p50: quantile(&l, 0.50),
                p99: quantile(&l, 0.99),
                max: *l.last().unwrap_or(&Duration::ZERO),
            }
        })
        .collect()
}

/// The `q` quantile of sorted `values` (nearest rank), zero for none.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    crate::stats::nearest_rank(sorted, q).unwrap_or_default()
}

/// A duration as seconds with 2 decimals up to a minute, then `XmYYs`.
pub fn secs(d: Duration) -> String {
    if d < Duration::from_secs(60) {
        format!("{:.2}s", d.as_secs_f64())
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&v, 0.50), Duration::from_millis(50));
        assert_eq!(quantile(&v[..1], 0.99), Duration::from_millis(1));
        assert_eq!(quantile(&[], 0.99), Duration::ZERO);
    }

    #[test]
    fn latencies_fall_in_the_minute_of_their_send() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let sent = HashMap::from([
            ("a".to_string(), at(1)),
            ("b".to_string(), at(61)),
            ("c".to_string(), at(62)),
        ]);
        let ok = HashMap::from([("a".to_string(), at(3)), ("b".to_string(), at(62))]);
        let m = per_minute(t0, &sent, &ok);
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].minute, m[0].delivered, m[0].p99),
            (0, 1, Duration::from_secs(2))
        );
        assert_eq!(
            (m[1].minute, m[1].delivered, m[1].max),
            (1, 1, Duration::from_secs(1))
        );
    }
}
