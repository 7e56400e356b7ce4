"""Raw data -> the M-BEIR layout -> shards: one module per source, each a `lamra-pl` subcommand.

mbeir.py   lamra-pl convert-mbeir: an M-BEIR folder -> training shards, task folders, pools
nli.py     lamra-pl convert-nli: SimCSE NLI triples -> text-only training shards
emoji.py   lamra-pl emoji: the embedded default data set (OpenMoji images, CLDR names) in M-BEIR layout
"""
