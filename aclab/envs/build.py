"""Envs for a run's config: one place that turns ``config.env`` into :func:`aclab.envs.make_env` arguments.

Used by the training loop, evaluation, actors (threads, processes, Ray) and the analyses. ``config`` is an
:class:`aclab.config.Config` (not imported here: the env layer sits on the ground floor).
"""

from __future__ import annotations

from aclab.envs.make import make_env, resolve_backend
from aclab.envs.registry import import_env_modules


def build_envs(config, *, num_envs: int | None = None, seed: int | None = None, options: dict | None = None,
               level_control: bool = False, render: bool = False):
    """``make_env`` for ``config.env`` (its ``imports`` are imported first), ``num_envs`` / ``seed`` / extra
    ``options`` overriding the config's; ``render=True``: env 0 gives RGB frames (videos);
    ``level_control=True``: per-episode level choice (prioritised level replay). With ``env.backend = "auto"``
    a different ``num_envs`` keeps the training envs' backend (:func:`aclab.envs.make.resolve_backend`)."""
    e = config.env
    import_env_modules(getattr(e, "imports", ()))
    backend = e.backend
    if num_envs and num_envs != e.num_envs and backend == "auto" and not render and not level_control:
        backend = resolve_backend(e.id, e.num_envs, backend, e.options)  # the training envs' simulator
    return make_env(
        e.id,
        num_envs or e.num_envs,
        config.seed if seed is None else seed,
        backend=backend,
        num_threads=e.num_threads,
        options={**e.options, **(options or {})},
        normalize_obs=e.normalize_obs,
        obs_clip=e.obs_clip,
        obs_scale=e.obs_scale,
        normalize_reward=e.normalize_reward,
        reward_gamma=e.reward_gamma,
        reward_clip=e.reward_clip,
        level_control=level_control,
        render=render,
    )
