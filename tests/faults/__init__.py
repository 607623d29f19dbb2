"""The fault suite: damaged shards and stores, property tests over every command, figures."""
