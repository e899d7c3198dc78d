"""Videos of a policy: ``aclab eval RUN --video DIR`` (MP4 through imageio-ffmpeg's own ffmpeg binary, or GIF).

:func:`record_videos` plays ``episodes`` evaluation episodes with ``algo.act`` on one env that gives
frames (:func:`aclab.envs.make_env` with ``render=True``: EnvPool's renderer for classic control, Atari
(the full 210x160 colour screen) and Procgen (the 64x64 frame the agent sees); Gymnasium's
``render_mode="rgb_array"`` for Gymnasium ids, your own envs and MuJoCo, which renders through EGL) and
writes one file per episode. Observation-normalisation statistics come from the training envs, as in
:func:`aclab.evaluate.policy.evaluate`. Small frames are enlarged by an integer factor (nearest
neighbour) to at least :data:`MIN_SIDE` pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from aclab.config import Config
from aclab.envs import build_envs
from aclab.evaluate.policy import EVAL_SEED_OFFSET, eval_options

FORMATS = ("mp4", "gif")


class VideoError(ValueError):
    """No video can be made of this env here; the message says why."""


MIN_SIDE = 256
DEFAULT_FPS = 30
VIDEO_SEED_OFFSET = 7


def enlarge(frame: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """Repeat pixels so the shorter side is at least ``min_side``; pad to even sizes (H.264 needs them)."""
    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = np.repeat(frame[:, :, None], 3, axis=2)
    factor = max(1, int(np.ceil(min_side / min(frame.shape[:2]))))
    if factor > 1:
        frame = frame.repeat(factor, axis=0).repeat(factor, axis=1)
    pad = ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0))
    return np.pad(frame, pad, mode="edge") if any(p[1] for p in pad[:2]) else frame


def write_video(frames: list[np.ndarray], path: Path, fps: int) -> Path:
    """Write ``frames`` (uint8 ``[H, W, 3]``) as MP4 (H.264, imageio-ffmpeg) or GIF (by the suffix)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        imageio.mimsave(path, frames, duration=1000.0 / fps, loop=0)
    else:
        with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=1,
                                ffmpeg_log_level="error") as writer:
            for frame in frames:
                writer.append_data(frame)
    return path


def _fps(envs, config: Config) -> int:
    backend = envs._backend
    env = getattr(backend, "env", None)
    single = env.envs[0] if hasattr(env, "envs") else env
    fps = (getattr(single, "metadata", None) or {}).get("render_fps")
    return int(fps) if fps else DEFAULT_FPS


def record_videos(algo, config: Config, out_dir: str | Path, *, episodes: int = 1, split: str = "test",
                  fmt: str = "mp4", deterministic: bool | None = None, train_envs=None, fps: int | None = None,
                  max_steps: int = 100_000, prefix: str = "episode") -> list[tuple[Path, float, int]]:
    """Play ``episodes`` episodes and write ``out_dir/<prefix>-<k>.<fmt>``; returns ``(path, return, length)``
    per episode. ``fps``: default the env's ``render_fps`` (Gymnasium metadata), else 30."""
    if fmt not in FORMATS:
        raise ValueError(f"video format {fmt!r}: expected one of {', '.join(FORMATS)}")
    os.environ.setdefault("MUJOCO_GL", "egl")  # MuJoCo renders off-screen (no display)
    deterministic = config.eval.deterministic if deterministic is None else deterministic
    seed = config.seed + EVAL_SEED_OFFSET + VIDEO_SEED_OFFSET
    envs = build_envs(config, num_envs=1, seed=seed, options=eval_options(config, split), render=True)
    written = []

    def frame() -> np.ndarray:
        try:
            return enlarge(envs.render())
        except Exception as exc:  # noqa: BLE001 - a renderer's own error (missing pygame, no GL), said plainly
            raise VideoError(f"{config.env.id}: cannot render frames: {exc}") from exc

    try:
        if train_envs is not None:
            envs.copy_normalization_from(train_envs, freeze=True)
        envs.set_normalization_update(False)
        envs.reset(seed=seed)
        rate = fps or _fps(envs, config)
        for k in range(episodes):
            frames = [frame()]
            for _ in range(max_steps):
                result = envs.step(algo.act(envs.obs, deterministic))
                frames.append(frame())
                if result.episode_length[0] > 0:
                    break
            envs.step(algo.act(envs.obs, deterministic))  # the dummy step: the next episode's first frame
            path = write_video(frames, Path(out_dir) / f"{prefix}-{k}.{fmt}", rate)
            written.append((path, float(result.episode_return[0]), int(result.episode_length[0])))
    finally:
        envs.close()
    return written
