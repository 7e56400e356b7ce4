"""`make demo`: the whole pipeline on a tiny backbone and real emoji data (built in the data milestone)."""

import sys

if __name__ == "__main__":
    sys.exit(
        "make demo: the emoji data recipe and the demo pipeline are not built yet (issue 3). "
        "Meanwhile: make tiny-backbone, then make stage1 CONFIG=experiments/tiny/stage1_text.yaml "
        'ARGS="--data.init_args.train_shards=DIR" on a shard folder.'
    )
