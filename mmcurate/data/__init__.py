"""Data at rest: shards (read and written), the embedding store, uids, subset files."""
