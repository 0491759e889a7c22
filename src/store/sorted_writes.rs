//! The writes of one batch, handed to fjall in key order.

use fjall::{Keyspace, OwnedWriteBatch, UserKey, UserValue};

/// Gathers a batch's inserts and hands them to fjall sorted by keyspace and key. fjall
/// inserts a batch into its memtables (skiplists) one entry at a time, under the journal
/// lock; an insert next to the previous one finds its search path in the CPU cache,
/// where the random ids of `current` and `compartment` made most inserts miss it at every
/// level. Inserts of one key keep their order, so the last one still wins.
pub(super) struct SortedWrites {
    entries: Vec<(Keyspace, UserKey, UserValue)>,
}

impl SortedWrites {
    pub fn new() -> SortedWrites {
        SortedWrites {
            entries: Vec::new(),
        }
    }

    pub fn insert(
        &mut self,
        keyspace: &Keyspace,
        key: impl Into<UserKey>,
        value: impl Into<UserValue>,
    ) {
        self.entries
            .push((keyspace.clone(), key.into(), value.into()));
    }

    /// Appends every write to `batch`, in keyspace and key order.
    pub fn append_to(mut self, batch: &mut OwnedWriteBatch) {
        self.entries.sort_by(
            |(left_keyspace, left_key, _), (right_keyspace, right_key, _)| {
                (left_keyspace.id(), left_key).cmp(&(right_keyspace.id(), right_key))
            },
        );
        for (keyspace, key, value) in self.entries {
            batch.insert(&keyspace, key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_written_repeatedly_in_one_batch_keeps_its_last_value() {
        let directory = tempfile::tempdir().unwrap();
        let database = fjall::Database::builder(directory.path()).open().unwrap();
        let first = database
            .keyspace("first", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        let second = database
            .keyspace("second", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        let mut writes = SortedWrites::new();
        writes.insert(&second, *b"b", *b"second b");
        for round in 0..64u8 {
            writes.insert(&first, *b"k", [b'o', b'l', b'd', round]);
            writes.insert(&second, [b'x', round], *b"filler");
        }
        writes.insert(&first, *b"a", *b"first a");
        writes.insert(&first, *b"k", *b"new");
        for round in 0..64u8 {
            writes.insert(&first, [b'y', round], *b"filler");
        }
        let mut batch = database.batch();
        writes.append_to(&mut batch);
        batch.commit().unwrap();
        assert_eq!(&*first.get(b"k").unwrap().unwrap(), b"new");
        assert_eq!(&*first.get(b"a").unwrap().unwrap(), b"first a");
        assert_eq!(&*second.get(b"b").unwrap().unwrap(), b"second b");
    }
}
