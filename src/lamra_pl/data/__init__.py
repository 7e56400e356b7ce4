"""Data: the training-sample schema, WebDataset shard writing and reading, the shard DataModule."""
