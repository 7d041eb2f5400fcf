"""Training drafters here: data from the target itself, features on disk, heads in the cache."""
