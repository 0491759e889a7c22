//! A map whose entries lapse at an instant: what the server remembers about issued tokens
//! and spent assertion `jti`s. Lapsed entries are dropped in bulk when the map has doubled
//! since the last sweep, so the cost per insert stays constant.

use std::collections::HashMap;
use std::hash::Hash;

/// The size below which the map is never swept.
const FIRST_SWEEP_AT: usize = 1024;

pub struct ExpiringMap<K, V> {
    /// Each value with the second (since the Unix epoch) after which it no longer counts.
    entries: HashMap<K, (V, u64)>,
    sweep_at: usize,
}

impl<K: Eq + Hash, V> Default for ExpiringMap<K, V> {
    fn default() -> Self {
        ExpiringMap {
            entries: HashMap::new(),
            sweep_at: FIRST_SWEEP_AT,
        }
    }
}

impl<K: Eq + Hash, V> ExpiringMap<K, V> {
    /// The value under `key` unless it lapsed before `now_seconds`.
    pub fn get(&self, key: &K, now_seconds: u64) -> Option<&V> {
        self.entries
            .get(key)
            .filter(|(_, lapses_at)| *lapses_at >= now_seconds)
            .map(|(value, _)| value)
    }

    /// Keeps `value` under `key` until `lapses_at`, replacing what was there.
    pub fn insert(&mut self, key: K, value: V, lapses_at: u64, now_seconds: u64) {
        if self.entries.len() >= self.sweep_at {
            self.entries
                .retain(|_, (_, entry_lapses_at)| *entry_lapses_at >= now_seconds);
            self.sweep_at = (self.entries.len() * 2).max(FIRST_SWEEP_AT);
        }
        self.entries.insert(key, (value, lapses_at));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapsed_entries_are_invisible_and_swept() {
        let mut map = ExpiringMap::default();
        map.insert("old".to_owned(), 1, 10, 0);
        assert_eq!(map.get(&"old".to_owned(), 10), Some(&1));
        assert_eq!(map.get(&"old".to_owned(), 11), None);
        for index in 1..FIRST_SWEEP_AT {
            map.insert(index.to_string(), 2, 10, 0);
        }
        map.insert("new".to_owned(), 3, 100, 50);
        assert_eq!(map.len(), 1);
        assert_eq!(map.get(&"new".to_owned(), 50), Some(&3));
    }
}
