//! Which Webhooks a message matches, by event name and headers: a byte trie of every Webhook's
//! `events` prefixes, so a lookup walks the event name once (O(name length) nodes, however many
//! Webhooks there are) and collects the Webhooks whose prefix ends on the way; then each candidate's
//! `matchHeaders` are compared with the message's headers.
//!
//! A prefix matches byte-wise: `temp` matches `temp`, `temperature` and `temperature/basement`, not
//! `high_temp`; the empty prefix matches every name. A Webhook matched by two of its prefixes is
//! returned once.

use std::collections::BTreeMap;

#[derive(Default)]
struct Node {
    /// Sorted by byte.
    children: Vec<(u8, u32)>,
    /// Webhooks with a prefix ending here.
    here: Vec<u32>,
}

/// The matching index of a snapshot; Webhooks are numbered in the order given to [`Index::new`].
#[derive(Default)]
pub struct Index {
    nodes: Vec<Node>,
    /// Per Webhook: its `matchHeaders` (name, value).
    headers: Vec<Vec<(String, String)>>,
}

impl Index {
    /// The index of Webhooks `(events prefixes, matchHeaders)`, numbered 0, 1, … in order.
    pub fn new<'a>(webhooks: impl IntoIterator<Item = (&'a [String], &'a BTreeMap<String, String>)>) -> Self {
        let mut index = Index {
            nodes: vec![Node::default()],
            headers: Vec::new(),
        };
        for (i, (events, match_headers)) in webhooks.into_iter().enumerate() {
            let i = u32::try_from(i).expect("fewer than 2^32 Webhooks");
            index.headers.push(
                match_headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
            for prefix in events {
                let node = index.insert(prefix.as_bytes());
                let here = &mut index.nodes[node].here;
                if here.last() != Some(&i) {
                    here.push(i);
                }
            }
        }
        index
    }

    fn insert(&mut self, prefix: &[u8]) -> usize {
        let mut at = 0usize;
        for &b in prefix {
            let next = match self.nodes[at].children.binary_search_by_key(&b, |(c, _)| *c) {
                Ok(k) => self.nodes[at].children[k].1 as usize,
                Err(k) => {
                    let new = self.nodes.len();
                    self.nodes.push(Node::default());
                    self.nodes[at].children.insert(k, (b, new as u32));
                    new
                }
            };
            at = next;
        }
        at
    }

    /// Webhooks (their numbers, ascending, each once) matching event `name` whose `matchHeaders` all
    /// equal the message's (`header` gives a header's string value), and how many trie nodes the walk
    /// visited.
    pub fn lookup(&self, name: &str, header: impl Fn(&str) -> Option<String>) -> (Vec<usize>, usize) {
        let mut found: Vec<u32> = Vec::new();
        let mut at = 0usize;
        let mut visited = 1;
        found.extend(&self.nodes[0].here);
        for &b in name.as_bytes() {
            let node = &self.nodes[at];
            match node.children.binary_search_by_key(&b, |(c, _)| *c) {
                Ok(k) => {
                    at = node.children[k].1 as usize;
                    visited += 1;
                    found.extend(&self.nodes[at].here);
                }
                Err(_) => break,
            }
        }
        found.sort_unstable();
        found.dedup();
        let matched = found
            .into_iter()
            .map(|i| i as usize)
            .filter(|&i| {
                self.headers[i]
                    .iter()
                    .all(|(k, v)| header(k).as_deref() == Some(v.as_str()))
            })
            .collect();
        (matched, visited)
    }

    /// Trie nodes (the root included).
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Webhook in a test: its prefixes and its match headers.
    type Spec<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);

    fn index(hooks: &[Spec<'_>]) -> Index {
        let owned: Vec<(Vec<String>, BTreeMap<String, String>)> = hooks
            .iter()
            .map(|(e, h)| {
                (
                    e.iter().map(|s| s.to_string()).collect(),
                    h.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                )
            })
            .collect();
        Index::new(owned.iter().map(|(e, h)| (e.as_slice(), h)))
    }

    fn names(ix: &Index, name: &str, headers: &[(&str, &str)]) -> Vec<usize> {
        let h = |k: &str| headers.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        ix.lookup(name, h).0
    }

    #[test]
    fn a_prefix_matches_by_bytes_from_the_start() {
        let ix = index(&[
            (&["temp"], &[]),
            (&["high"], &[]),
            (&[""], &[]),
            (&["temperature/b"], &[]),
        ]);
        assert_eq!(names(&ix, "temp", &[]), [0, 2]);
        assert_eq!(names(&ix, "temperature", &[]), [0, 2]);
        assert_eq!(names(&ix, "temperature/basement", &[]), [0, 2, 3]);
        assert_eq!(names(&ix, "high_temp", &[]), [1, 2]);
        assert_eq!(names(&ix, "te", &[]), [2]);
        assert_eq!(names(&ix, "", &[]), [2]);
        assert_eq!(names(&ix, "Temp", &[]), [2], "case-sensitive");
    }

    #[test]
    fn two_prefixes_of_one_webhook_match_it_once() {
        let ix = index(&[(&["t", "temp", "temp"], &[]), (&["x"], &[])]);
        assert_eq!(names(&ix, "temperature", &[]), [0]);
        assert_eq!(names(&ix, "x", &[]), [1]);
    }

    #[test]
    fn every_match_header_must_equal() {
        let ix = index(&[
            (&["temp"], &[("device", "d-1")]),
            (&["temp"], &[("device", "d-1"), ("site", "a")]),
            (&["temp"], &[]),
        ]);
        assert_eq!(names(&ix, "temp", &[("device", "d-1")]), [0, 2]);
        assert_eq!(names(&ix, "temp", &[("device", "d-1"), ("site", "a")]), [0, 1, 2]);
        assert_eq!(names(&ix, "temp", &[("device", "d-2"), ("site", "a")]), [2]);
        assert_eq!(names(&ix, "temp", &[]), [2]);
    }

    #[test]
    fn no_webhook_no_match() {
        let ix = index(&[]);
        assert!(names(&ix, "anything", &[]).is_empty());
        let ix = index(&[(&[], &[])]);
        assert!(names(&ix, "anything", &[]).is_empty(), "no prefix, no match");
    }

    /// 10,000 Webhooks: a lookup visits at most name length + 1 nodes, whatever their number.
    #[test]
    fn a_lookup_walks_the_name_not_the_webhooks() {
        let owned: Vec<(Vec<String>, BTreeMap<String, String>)> = (0..10_000)
            .map(|i| (vec![format!("device/{i:05}/temp")], BTreeMap::new()))
            .collect();
        let ix = Index::new(owned.iter().map(|(e, h)| (e.as_slice(), h)));
        assert!(ix.nodes() > 10_000);
        let name = "device/04242/temperature";
        let (found, visited) = ix.lookup(name, |_| None);
        assert_eq!(found, [4242]);
        assert!(visited <= name.len() + 1, "{visited}");
        let (found, visited) = ix.lookup("other/x", |_| None);
        assert!(found.is_empty());
        assert_eq!(visited, 1);
        let started = std::time::Instant::now();
        for i in 0..10_000 {
            let (found, _) = ix.lookup(&format!("device/{i:05}/temp/x"), |_| None);
            assert_eq!(found, [i]);
        }
        eprintln!("10,000 lookups among 10,000 webhooks: {:?}", started.elapsed());
    }
}
