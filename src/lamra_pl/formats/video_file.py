"""Video container files (MP4, AVI, MKV, WebM, MOV, ...) decoded to the frames this project stores and reads.

A video item holds decoded frames (`lamra_pl.formats.sample`); a video file becomes those frames here, with PyAV
(the `av` package, FFmpeg's decoders; installed by the `video` extra), by the converters (`lamra_pl.recipes`) and by
the API and `search --video FILE` (`lamra_pl.api.Video`):

* frames are taken at about `fps` frames per second of video (default `STORED_FPS`, qwen-vl-utils' and LamRA's 2.0:
  every frame a Qwen2-VL reader sampling by fps would take), or every frame with `fps` None;
* at most `max_frames` frames (default `MAX_STORED_FRAMES`): a longer video is thinned to that many frames spread
  evenly over it (a first pass halves the rate whenever twice as many are kept, so memory stays bounded whatever
  the video's length);
* each frame is shrunk (aspect kept) to at most `max_pixels` pixels (default `VIDEO_MAX_PIXELS`, Qwen2-VL's bound of a
  video frame, so nothing stored is larger than what the model may read).

The model then samples its own frame budget from the stored frames (`lamra_pl.models.video`); the frame rate of the
stored frames is returned with them so that sampling by fps works. Anything unreadable (not a video, no video stream,
no decodable frame, a frame over `MAX_IMAGE_PIXELS`) is refused with one line naming the file (`LamraError`).
Decoding is deterministic: the same file gives the same frames.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import MAX_IMAGE_PIXELS, MAX_STORED_FRAMES

STORED_FPS = 2.0  # qwen-vl-utils' FPS, what LamRA's MSR-VTT evaluation samples at
VIDEO_MAX_PIXELS = 768 * 28 * 28  # qwen-vl-utils' VIDEO_MAX_PIXELS: Qwen2-VL's largest video frame


def read_video(
    path: str | Path,
    fps: float | None = STORED_FPS,
    max_frames: int = MAX_STORED_FRAMES,
    max_pixels: int | None = VIDEO_MAX_PIXELS,
) -> tuple[list[Image.Image], float | None]:
    """The frames (RGB, in time order) of the video file at `path` and their frame rate (None for one frame).

    Raises LamraError naming the file when it cannot be read as a video."""
    if fps is not None and not fps > 0:
        raise LamraError(f"a video's frame rate to sample must be positive, not {fps}")
    if max_frames < 1:
        raise LamraError(f"a video's most frames must be at least 1, not {max_frames}")
    try:
        import av
    except ImportError:
        raise LamraError(
            f"reading the video file {str(path)!r} needs PyAV: pip install av (or lamra-pl's `video` extra)"
        ) from None
    name = os.fspath(path)
    if not Path(name).is_file():
        raise LamraError(f"video file {name!r} does not exist")
    kept: list[tuple[float, Image.Image]] = []  # (seconds, frame)
    step = 1.0 / fps if fps else 0.0  # seconds between kept frames (0: every frame)
    try:
        with av.open(name, mode="r") as container:
            if not container.streams.video:
                raise LamraError(f"video file {name!r} holds no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate) if stream.average_rate else None
            start, due = None, 0.0
            for number, frame in enumerate(container.decode(stream)):
                if frame.width * frame.height > MAX_IMAGE_PIXELS:
                    raise LamraError(
                        f"video file {name!r}: its frames are {frame.width}x{frame.height}, over {MAX_IMAGE_PIXELS} "
                        "pixels"
                    )
                seconds = frame.time if frame.time is not None else number / (rate or 1.0)
                start = seconds if start is None else start
                if seconds - start + 1e-6 < due:
                    continue
                due = seconds - start + step if step else 0.0
                kept.append((seconds - start, shrink(frame.to_image(), max_pixels)))
                if len(kept) > 2 * max_frames:  # bounded memory: keep every other frame, take half as many
                    kept = kept[::2]
                    step = 2 * step if step else 2.0 / (rate or 1.0)
                    due = kept[-1][0] + step
    except LamraError:
        raise
    except Exception as err:  # PyAV raises FFmpegError subclasses, and OSError/ValueError on odd files
        raise LamraError(f"video file {name!r} cannot be read as a video ({type(err).__name__}: {err})") from None
    if not kept:
        raise LamraError(f"video file {name!r} holds no decodable frame")
    if len(kept) > max_frames:  # evenly, as qwen-vl-utils samples (linspace over the kept frames, rounded)
        n = len(kept)
        kept = [kept[round(i * (n - 1) / (max_frames - 1))] for i in range(max_frames)] if max_frames > 1 else kept[:1]
    span = kept[-1][0] - kept[0][0]
    stored_fps = (len(kept) - 1) / span if len(kept) > 1 and span > 0 else None
    return [frame for _, frame in kept], stored_fps


def shrink(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """`image` in RGB, scaled down (aspect kept) to at most `max_pixels` pixels."""
    image = image.convert("RGB")
    if max_pixels is None or image.width * image.height <= max_pixels:
        return image
    scale = (max_pixels / (image.width * image.height)) ** 0.5
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)
