"""Retriever training-step throughput, peak memory and MFU, with and without GradCache.

    python experiments/benchmarks/train_step.py --shape tiny --batch-sizes 8 16 32 --gradcache 0 8
    python experiments/benchmarks/train_step.py --shape 2b --batch-sizes 32 64 128 --gradcache 0 --device cuda
    python experiments/benchmarks/train_step.py --shape 2b --batch-sizes 1024 --gradcache 64 --device cuda

What one step is: `EmbeddingModule.training_step` under a real `Trainer` (one device), on a batch of B pairs;
every query and every candidate is an image of `--image-tokens` visual tokens (after the 2x2 merge) plus a text
of `--text-tokens` tokens, as in LamRA stage 2 (300 and 480). The backbone is a Qwen2-VL of the chosen shape with
random weights, written to disk and loaded with `from_pretrained`, with LoRA (`--lora-r`, alpha 2r, on every
language-model projection), SDPA and non-reentrant activation checkpointing; on CUDA the base is bfloat16 and
the Trainer runs `bf16-mixed`, on CPU everything is float32. The batch is collated once and fed every step, so
the figures are the model's, not the data pipeline's.

Reported per configuration (one subprocess each, so peak memory is its own; an out-of-memory is a row too):
samples/s (pairs), tokens/s (query + candidate tokens, padding included), peak memory (CUDA: the allocator's
peak; CPU: the process's peak RSS), and MFU = model FLOPs per step / step time / the device's peak.
- Model FLOPs per step are counted by `torch.utils.flop_counter.FlopCounterMode` on one forward and backward
  of one pair without activation checkpointing and without GradCache (eager attention, so attention matmuls
  are counted on every device), times B. Recomputation (checkpointing, GradCache's extra forward) is not model
  work, so it lowers MFU, as in PaLM's definition. The in-batch loss (B x B) is negligible and not scaled.
- The peak is measured here: the best of several large matmuls in the compute dtype (bfloat16 on CUDA,
  float32 on CPU).
Rows are appended as JSON lines to `--out` and printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from lamra_pl.formats.sample import Item
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.embedding_inputs import Example
from lamra_pl.models.gradcache import GradCacheSpec
from lamra_pl.testing.tiny import build_tiny_qwen2vl

# Qwen2-VL-2B/7B-Instruct's published config.json values (language model and vision tower).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 512},
    "2b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_layers": 28,
        "num_heads": 12,
        "num_kv_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "vision_depth": 32,
        "vision_dim": 1280,
        "vision_heads": 16,
        "vision_mlp_ratio": 4,
    },
    "7b": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_layers": 28,
        "num_heads": 28,
        "num_kv_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "vision_depth": 32,
        "vision_dim": 1280,
        "vision_heads": 16,
        "vision_mlp_ratio": 4,
    },
}
WORDS = ["red", "green", "blue", "small", "large", "photo", "of", "a", "cat", "dog", "house", "tree", "car", "sky"]


def build_backbone(args: argparse.Namespace) -> Path:
    """The shape's random checkpoint in `--cache` (built once)."""
    cuda = args.device == "cuda"
    shape = dict(SHAPES[args.shape])
    if args.layers:  # a smoke test of a big shape: its widths, heads and vocabulary with fewer layers
        shape.update(num_layers=args.layers, vision_depth=args.layers)
    out = Path(args.cache) / f"qwen2vl-{args.shape}-{shape['num_layers']}l-{args.device}"
    if not (out / "config.json").is_file():
        pixels = args.image_tokens * 28 * 28
        dtype = torch.bfloat16 if cuda else torch.float32
        build_tiny_qwen2vl(out, **shape, min_pixels=4 * 28 * 28, max_pixels=pixels, dtype=dtype)
    return out


def pairs(batch_size: int, image_tokens: int, text_tokens: int) -> list[Example]:
    """Image + text on both sides; the text is long enough for `max_text_tokens` to cut it to `text_tokens`."""
    # A merged token is 28 x 28 pixels (2 x 2 patches of 14): h x w tokens are 28h x 28w pixels.
    h = max(1, int(image_tokens**0.5))
    while image_tokens % h:
        h -= 1
    w = image_tokens // h
    examples = []
    for i in range(batch_size):
        image = Image.new("RGB", (28 * w, 28 * h), color=(i * 37 % 256, i * 91 % 256, i * 53 % 256))
        text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(4 * text_tokens))
        query = Item(f"q{i}", text=text, image=image)
        positive = Item(f"c{i}", text=text[::-1], image=image.rotate(90, expand=True))
        examples.append(Example(query, positive, [], [positive.id]))
    return examples


class FixedBatch(LightningDataModule):
    def __init__(self, batch: dict[str, Any]) -> None:
        super().__init__()
        self.batch = batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.batch] * 10_000, batch_size=None)  # the Trainer stops at max_steps


class StepTimer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def _sync(self, module: EmbeddingModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: Trainer, module: EmbeddingModule, batch: Any, i: int) -> None:
        if i == self.warmup and module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(module.device)
        self._sync(module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, module: EmbeddingModule, out: Any, batch: Any, i: int) -> None:
        self._sync(module)
        if i >= self.warmup:
            self.times.append(time.perf_counter() - self._start)


def make_module(backbone: Path, args: argparse.Namespace, *, gradcache: int, count: bool) -> EmbeddingModule:
    cuda = args.device == "cuda"
    spec = BackboneSpec(
        backbone,
        min_pixels=4 * 28 * 28,
        max_pixels=args.image_tokens * 28 * 28,
        dtype="bfloat16" if cuda else "float32",
        attn_implementation="eager" if count else "sdpa",
        gradient_checkpointing=not count,
    )
    return EmbeddingModule(
        spec,
        lora=LoraSpec(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.05),
        max_text_tokens=args.text_tokens,
        gradcache=GradCacheSpec(gradcache) if gradcache else None,
    )


def count_flops_per_pair(backbone: Path, args: argparse.Namespace) -> int:
    module = make_module(backbone, args, gradcache=0, count=True)
    module.configure_model()
    module.to(args.device).train()
    batch = module.collator()(pairs(1, args.image_tokens, args.text_tokens))
    batch = {k: v.to(args.device) if hasattr(v, "to") else v for k, v in batch.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda")
    with FlopCounterMode(display=False) as counter, autocast:
        loss, _ = module.contrastive_loss(batch, gather=False)
        loss.backward()
    return counter.get_total_flops()


def matmul_peak(device: str, seconds: float = 3.0) -> float:
    """FLOP/s of the best of repeated square matmuls in the compute dtype (the peak MFU is measured against)."""
    dtype, n = (torch.bfloat16, 8192) if device == "cuda" else (torch.float32, 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * n**3 / best


def one(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration, in this process."""
    cuda = args.device == "cuda"
    backbone = build_backbone(args)
    batch_size, gradcache = args.batch_sizes[0], args.gradcache[0]
    row: dict[str, Any] = {
        "shape": args.shape + (f" ({args.layers} layers)" if args.layers else ""),
        "batch": batch_size,
        "gradcache": gradcache or None,
    }
    module = make_module(backbone, args, gradcache=gradcache, count=False)
    batch = module.collator()(pairs(batch_size, args.image_tokens, args.text_tokens))
    sides = [*batch["query"], *batch["candidates"]] if gradcache else [batch["query"], batch["candidates"]]
    tokens = sum(int(s["attention_mask"].numel()) for s in sides)
    timer = StepTimer(args.warmup)
    trainer = Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    try:
        trainer.fit(module, datamodule=FixedBatch(batch))
    except torch.OutOfMemoryError:
        return {**row, "oom": True}
    step = sorted(timer.times)[len(timer.times) // 2]  # median
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**row, "step_s": step, "samples_s": batch_size / step, "tokens_s": tokens / step, "peak_gb": peak / 1e9}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--gradcache", type=int, nargs="+", default=[0, 8], help="chunk sizes; 0 = without")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=0, help="override the decoder and vision depth (smoke test)")
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--image-tokens", type=int, default=300)
    parser.add_argument("--text-tokens", type=int, default=480)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lamra-bench"), help="backbones")
    parser.add_argument("--out", default="experiments/benchmarks/train_step.jsonl")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single configuration
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(one(args)))
        return

    cuda = args.device == "cuda"
    flops_per_pair = count_flops_per_pair(build_backbone(args), args)
    if cuda:
        torch.cuda.empty_cache()  # the counting model is gone; each configuration runs in its own process
    peak = matmul_peak(args.device)
    context = {
        "device": device_name(args.device),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "peak_tflops": peak / 1e12,
        "model_gflops_per_pair": flops_per_pair / 1e9,
        "lora_r": args.lora_r,
        "image_tokens": args.image_tokens,
        "text_tokens": args.text_tokens,
    }
    print(json.dumps(context))
    rows = []
    for gradcache in args.gradcache:
        for batch_size in args.batch_sizes:
            if gradcache and gradcache >= batch_size:
                continue
            command = [sys.executable, __file__, *sys.argv[1:], "--one"]
            command += ["--batch-sizes", str(batch_size), "--gradcache", str(gradcache)]
            proc = subprocess.run(command, capture_output=True, text=True)
            found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if not found:
                oom = "OutOfMemoryError" in proc.stderr
                row = {"shape": args.shape, "batch": batch_size, "gradcache": gradcache or None, "oom": oom}
                if not oom:
                    raise SystemExit(f"batch {batch_size}, gradcache {gradcache} failed:\n{proc.stderr[-3000:]}")
            else:
                row = json.loads(found[-1])
            if not row.get("oom"):
                row["mfu"] = flops_per_pair * batch_size / row["step_s"] / peak
            rows.append({**context, **row})
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\n{context['device']}, peak {peak / 1e12:.2f} TFLOP/s, {flops_per_pair / 1e9:.2f} model GFLOP per pair\n")
    print("| shape | batch | GradCache chunk | samples/s | tokens/s | peak memory (GB) | MFU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['shape']} | {r['batch']} | {r['gradcache'] or '-'} | OOM | | | |")
            continue
        print(
            f"| {r['shape']} | {r['batch']} | {r['gradcache'] or '-'} | {r['samples_s']:.2f} | {r['tokens_s']:.0f} "
            f"| {r['peak_gb']:.2f} | {100 * r['mfu']:.1f}% |"
        )


if __name__ == "__main__":
    main()
