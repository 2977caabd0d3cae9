"""Data: the synthetic benchmark, official annotation formats, preprocessing into shards, S3 transfer."""
