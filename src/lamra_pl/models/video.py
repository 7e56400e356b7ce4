"""Video inputs: the frame budget a video is sampled to before the backbone's own video processor reads it.

A video item (`lamra_pl.formats.sample.Item.video`) holds its stored frames in time order. Before a collator hands it
to the processor (`videos=`, one `{"type": "video"}` part in the chat), its frames are thinned here, so what the
model sees is fixed by the settings and not by how densely a converter stored the video:

* `fps` set and the item's frame rate known: about `fps` frames per second of video (qwen-vl-utils' rule, at least
  `MIN_FRAMES`), at most `max_frames`;
* otherwise (the default, as LamRA's evaluation code: `nframes` 12 for the retriever, 8 for the reranker): at most
  `max_frames` frames spread evenly over the video.

The count is rounded down to an even number (Qwen2-VL merges frames in pairs, `temporal_patch_size` 2, and would
otherwise repeat the last one) and the frames taken at `linspace(0, n - 1, count)` rounded, as qwen-vl-utils does.
Each frame is then resized by the processor within `min_pixels`..`max_pixels` (None: the video processor's own
bounds, Qwen2-VL's 128*28*28..768*28*28), with qwen-vl-utils' cap on a video's total pixels
(`cap_pixels_per_frame`). The video processor's own frame sampling is off (`do_sample_frames=False`): the frames
it receives are the ones to read.

Only backbones whose processor has a video processor read videos (the Qwen-VL families); any other refuses a video
item in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import Item

# LamRA's evaluation code samples `nframes` frames: 12 for the retriever's embeddings, 8 for the reranker's inputs.
EMBEDDING_FRAMES = 12
RERANK_FRAMES = 8
# qwen-vl-utils' least number of frames when sampling by fps (FPS_MIN_FRAMES).
MIN_FRAMES = 4
# The processor attribute that carries a backbone's budget (`load_processor` sets it from `BackboneSpec`).
VIDEO_BUDGET_ATTRIBUTE = "lamra_video_budget"


@dataclass(frozen=True)
class VideoBudget:
    """How a video is sampled for the model: `fps` (None: evenly, `max_frames` frames), `max_frames` (None: the
    reader's default, `EMBEDDING_FRAMES` or `RERANK_FRAMES`), the pixel bounds of one frame (None: the video
    processor's)."""

    fps: float | None = None
    max_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.fps is not None and not self.fps > 0:
            raise LamraError(f"video_fps must be positive, not {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise LamraError(f"video_max_frames must be at least 1, not {self.max_frames}")
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LamraError(f"video_{name} must be at least 1, not {value}")


def frame_indices(count: int, fps: float | None, budget: VideoBudget, default_frames: int) -> list[int]:
    """Which of a video's `count` stored frames (taken at `fps` frames per second, None if unknown) the model reads."""
    most = budget.max_frames or default_frames
    wanted = count
    if budget.fps is not None and fps:
        wanted = max(round(count / fps * budget.fps), MIN_FRAMES)
    wanted = min(wanted, most, count)
    if wanted >= 2:
        wanted -= wanted % 2
    if wanted <= 1:
        return [0]
    return [round(i * (count - 1) / (wanted - 1)) for i in range(wanted)]


def sampled_frames(item: Item, budget: VideoBudget, default_frames: int) -> list[Image.Image]:
    assert item.video is not None
    return [item.video[i] for i in frame_indices(len(item.video), item.video_fps, budget, default_frames)]


def budget_of(processor: Any) -> VideoBudget:
    return getattr(processor, VIDEO_BUDGET_ATTRIBUTE, None) or VideoBudget()


def reads_video(processor: Any) -> bool:
    return getattr(processor, "video_processor", None) is not None


def refuse_video(processor: Any, items: list[Item]) -> None:
    """One line when a video item meets a backbone that reads no video (LLaVA-Next, a text-only LM)."""
    if not reads_video(processor) and any(item.video is not None for item in items):
        video = next(item for item in items if item.video is not None)
        name = getattr(processor, "name", None) or type(processor).__name__
        raise LamraError(
            f"item {video.id!r} is a video, but backbone {name} reads no video (only the Qwen-VL families do); "
            "use a Qwen2-VL-family backbone or leave video items out"
        )


def video_inputs(processor: Any, items: list[Item], default_frames: int) -> dict[str, Any]:
    """The processor arguments for the videos of `items` (in order): `videos` and `videos_kwargs`, or {} if none."""
    refuse_video(processor, items)
    budget = budget_of(processor)
    videos = [sampled_frames(item, budget, default_frames) for item in items if item.video is not None]
    if not videos:
        return {}
    video_processor = processor.video_processor
    kwargs: dict[str, Any] = {"do_sample_frames": False}
    valid = getattr(getattr(video_processor, "valid_kwargs", None), "__annotations__", {})
    if "cap_pixels_per_frame" in valid:  # qwen-vl-utils' total bound (and the processor warns when it is unset)
        kwargs["cap_pixels_per_frame"] = True
    if budget.min_pixels is not None or budget.max_pixels is not None:
        size = dict(video_processor.size)
        if budget.min_pixels is not None:
            size["shortest_edge"] = budget.min_pixels
        if budget.max_pixels is not None:
            size["longest_edge"] = budget.max_pixels
        kwargs["size"] = size
    return {"videos": videos, "videos_kwargs": kwargs}


def video_tokens(item: Item, budget: VideoBudget, default_frames: int) -> int:
    """About how many tokens a video item's frames become (one per 28x28 patch of each pair of frames)."""
    if item.video is None:
        return 0
    frames = len(frame_indices(len(item.video), item.video_fps, budget, default_frames))
    first = item.video[0]
    return max(1, frames // 2) * (first.width * first.height // (28 * 28))
