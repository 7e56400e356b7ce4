"""Every on-disk contract of lamra-pl, one module each, each with its layout and its version.

    sample.py       a shard sample (one query with its candidates; a pool candidate) and the query an evaluation
                    encodes
    shards.py       shard folders: writing, `sizes.json`, globbing
    tar_index.py    samples' byte ranges inside a tar shard, damage detection
    task.py         an evaluation task folder (task.json, qrels.txt, queries/, pool/ids.txt)
    runs.py         a run folder (TREC run files, the versioned runs.json)
    index.py        an index folder (embeddings, ids, items, index.json)
    settings.py     the settings file a model folder carries (how `merge`d weights read their inputs)
    tensorboard.py  a TensorBoard run folder (hparams, hp/* final metrics, curves)

Modules here import nothing of the project but `lamra_pl.errors` and `lamra_pl.files`: every other layer reads and
writes its files through them.
"""
