"""Encoding throughput with length bucketing (`bucket=True`) vs unsorted batching, on a tiny random backbone.

    python experiments/benchmarks/encode_bucketing.py [--items 2000] [--batch-size 32] [--hidden-size 128]

A pool of text candidates with lengths drawn uniformly from `--min-words` to `--max-words` (random words from a
small vocabulary) is written to shards once; both modes iterate the same `ChunkedItems` (shard reading,
bucketing, collation) and embed every batch. Padded-tokens ratio = tokens fed to the model / real tokens.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lamra_pl.data.items import ChunkedItems, Job, plan
from lamra_pl.formats.sample import encode_candidate
from lamra_pl.formats.shards import write_shards
from lamra_pl.models.backbone import BackboneSpec
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.testing.tiny import build_tiny_qwen2vl


def random_texts(n: int, min_words: int, max_words: int, vocabulary: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(3, 9))) for _ in range(vocabulary)]
    lengths = rng.integers(min_words, max_words + 1, size=n)
    return [" ".join(words[i] for i in rng.integers(0, vocabulary, size=length)) for length in lengths]


def run(
    module: EmbeddingModule, shards: Path, batch_size: int, bucket: bool, max_batches: int | None = None
) -> tuple[float, float, int, int, int]:
    """(seconds, of which embedding, items, real tokens, padded tokens) of a pass over `shards` (or `max_batches`)."""
    dataset = ChunkedItems(plan([Job("unused", (str(shards),), "pool")]), module.collator(), batch_size, bucket)
    items = real = padded = 0
    embed_s = 0.0
    start = time.perf_counter()
    with torch.no_grad():
        for batch in itertools.islice(dataset, max_batches):
            inputs = batch["items"]
            tic = time.perf_counter()
            module.embed(inputs)
            embed_s += time.perf_counter() - tic
            items += inputs["input_ids"].shape[0]
            real += int(inputs["attention_mask"].sum())
            padded += inputs["input_ids"].numel()
    return time.perf_counter() - start, embed_s, items, real, padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--min-words", type=int, default=5)
    parser.add_argument("--max-words", type=int, default=300)
    parser.add_argument("--vocabulary", type=int, default=500, help="distinct words in the texts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=1000, help="items per shard (bucketing is per shard)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--max-text-tokens", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        texts = random_texts(args.items, args.min_words, args.max_words, args.vocabulary)
        backbone = build_tiny_qwen2vl(
            work / "backbone",
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            vision_dim=64,
            vocab_size=3000,
            corpus=texts,
        )
        shards = work / "pool"
        samples = (encode_candidate(f"c{i:06d}", id=f"c{i}", txt=t, image=None) for i, t in enumerate(texts))
        write_shards(samples, shards, maxcount=args.shard_size)

        module = EmbeddingModule(
            BackboneSpec(backbone, gradient_checkpointing=False), max_text_tokens=args.max_text_tokens
        )
        module.configure_model()
        module.eval()
        run(module, shards, args.batch_size, bucket=False, max_batches=1)  # warm-up

        results = {bucket: run(module, shards, args.batch_size, bucket) for bucket in (False, True)}
    base = results[False][2] / results[False][0]
    print("| batching | items | batch size | seconds | of which embed | items/s | padded/real tokens | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for bucket, (seconds, embed_s, items, real, padded) in results.items():
        rate = items / seconds
        name = "bucketed by length" if bucket else "unsorted"
        print(
            f"| {name} | {items:,} | {args.batch_size} | {seconds:.1f} | {embed_s:.1f} | {rate:.1f} "
            f"| {padded / real:.2f} | {rate / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
