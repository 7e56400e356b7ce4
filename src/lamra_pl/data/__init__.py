"""Data: the DataModules (shards, mixed sources), the resumable training stream, the evaluation pipeline, evaluation
items and pool candidates by id. The on-disk layouts they read are `lamra_pl.formats`'."""
