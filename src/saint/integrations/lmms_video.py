"""Videos for saint's lmms-eval Qwen-VL model: what a task's ``doc_to_visual`` gives
(lmms-eval's convention: the path of a video file; decoded frames are accepted too)
turned into the frames and metadata a Qwen-VL processor takes.

* A **path** ending in a video extension is decoded with PyAV (a dependency of
  lmms-eval itself, so present wherever the plugin runs). ``max_num_frames`` frames are
  taken uniformly over the whole video, first and last included (lmms-eval's Qwen
  models' default); with ``fps`` set, ``fps`` frames per second of video instead, at
  most ``max_num_frames`` and at least 2.
* A **4-D array** (``T x H x W x C`` uint8 numpy array or torch tensor) is taken as
  frames already sampled at ``fps`` frames per second (default 2, the rate Qwen-VL's
  own video pipeline samples at); more than ``max_num_frames`` are thinned uniformly.

The metadata (source frame rate, frame count, the indices taken) is what the
processors need for time: Qwen2.5-VL's ``second_per_grid_ts`` (temporal M-RoPE
positions) and Qwen3-VL's per-frame ``<t seconds>`` timestamps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".wmv", ".mpeg", ".mpg")
DEFAULT_ARRAY_FPS = 2.0


@dataclass
class Video:
    """Sampled frames (``T x H x W x 3`` uint8) and the processor's video metadata."""

    frames: np.ndarray
    fps: float  # frame rate of the source the indices refer to
    total_num_frames: int
    frames_indices: list[int]

    def metadata(self) -> dict[str, Any]:
        """The ``video_metadata`` entry of a Qwen-VL processor call."""
        return {"fps": self.fps, "total_num_frames": self.total_num_frames, "frames_indices": list(self.frames_indices),
                "duration": self.total_num_frames / self.fps}


def is_video_path(value: Any) -> bool:
    return isinstance(value, str) and value.lower().endswith(VIDEO_EXTENSIONS)


def is_frame_array(value: Any) -> bool:
    """A 4-D array of RGB frames (numpy or torch, channels last)."""
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) == 4 and shape[-1] == 3 and hasattr(value, "__array__")


def frame_indices(total: int, max_frames: int, fps: float | None = None, source_fps: float | None = None) -> list[int]:
    """Indices of the frames to keep out of ``total``: ``max_frames`` spread evenly (first
    and last included), or ``fps`` per second of a ``source_fps`` video (capped alike)."""
    if total < 1:
        raise ValueError("the video has no frames")
    if max_frames < 1:
        raise ValueError(f"max_num_frames={max_frames} must be >= 1")
    n = min(total, max_frames)
    if fps is not None and source_fps:
        n = min(n, max(2, round(total / source_fps * fps)))
    indices = sorted({int(i) for i in np.linspace(0, total - 1, n).round()})
    return indices * 2 if len(indices) == 1 else indices  # a frame group needs 2 frames: repeat a lone one


def read_video(path: str, max_frames: int, fps: float | None = None) -> Video:
    """Decode the frames :func:`frame_indices` picks from the video file at ``path``."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - lmms-eval depends on PyAV
        raise ImportError(f"{path}: decoding a video file needs PyAV (pip install av)") from e
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        total = stream.frames or sum(1 for _ in container.decode(stream))
    indices = frame_indices(total, max_frames, fps, rate)
    wanted, frames = set(indices), []
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
            if i >= indices[-1]:
                break
    if len(frames) != len(indices):  # the container's frame count was too high
        indices = indices[: len(frames)]
    if not frames:
        raise ValueError(f"{path}: no frame could be decoded")
    return Video(np.stack(frames), rate or DEFAULT_ARRAY_FPS, total, indices)


def array_video(frames: Any, max_frames: int, fps: float | None = None) -> Video:
    """Frames given as an array, taken as sampled at ``fps`` (default 2) per second."""
    arr = np.asarray(frames.cpu() if hasattr(frames, "cpu") else frames)
    if arr.dtype != np.uint8:
        raise ValueError(f"video frames must be uint8 RGB (T x H x W x 3), got {arr.dtype}")
    indices = frame_indices(len(arr), max_frames)
    return Video(arr[indices], float(fps or DEFAULT_ARRAY_FPS), len(arr), indices)


def to_video(value: Any, max_frames: int, fps: float | None = None) -> Video | None:
    """``value`` as a :class:`Video`, or None when it is not a video."""
    if is_video_path(value):
        return read_video(value, max_frames, fps)
    if is_frame_array(value):
        return array_video(value, max_frames, fps)
    return None
