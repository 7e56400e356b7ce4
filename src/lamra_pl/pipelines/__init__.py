"""The command-line jobs: each module's public functions are `lamra-pl` subcommands (their signatures and docstrings
are the command line, `lamra_pl.cli`), and the library calls behind them.

    encode.py       lamra-pl index: shard folders -> index folders, with Trainer.predict (resumable)
    retrieve.py     lamra-pl retrieve: task queries against an index -> run folders
    evaluate.py     lamra-pl evaluate, chance: run folders -> results and a TensorBoard run; chance level
    rerank.py       lamra-pl rerank, tune-fusion: run folders -> reranked, fused run folders
    rerank_data.py  lamra-pl rerank-data: a run folder of training queries -> reranker training shards
    mine.py         lamra-pl mine: a run folder of training queries -> MM-Embed hard-negative shards
    merge.py        lamra-pl merge: a training checkpoint -> a model folder
    export.py       lamra-pl export: a training checkpoint -> a folder other libraries load (a PEFT adapter)
    predict.py      the prediction scaffold the model-running jobs share (Trainer.predict over this rank's share)
    trainer.py      TrainerSpec, the Trainer they run in (`--trainer.*`): apart, so a command line needs no Lightning
"""
