"""Action-equivalence classes of a Procgen game, found by deterministic replay on the env.

Procgen exposes the same 15 actions in every game (the keyboard combinations of Cobbe et al. 2020):
``0 LEFT+DOWN, 1 LEFT, 2 LEFT+UP, 3 DOWN, 4 no-op, 5 UP, 6 RIGHT+DOWN, 7 RIGHT, 8 RIGHT+UP, 9 D, 10 A,
11 W, 12 S, 13 Q, 14 E``. Many games ignore some of them: in BigFish the six keys 9-14 do what the
no-op does, which leaves the "9 different actions (8 directional moves and 1 do nothing)" of the DCPG
paper, F.2. Counting a dynamics discriminator's accepted actions over the raw 15 (Table 8's OOD-action
count) then charges aliases of the true action as errors, and drawing "wrong" actions among them makes
label noise.

:func:`procgen_action_classes` finds the classes empirically. For each probe (a level and a prefix
length) it plays the same random prefix in 15 copies of that level, then action ``a`` in copy ``a``,
then the same ``horizon - 1`` further actions in all copies, and records every frame after the
prefix. Procgen is deterministic given the level and the actions (checked: the 15 copies must show the
same frame before they diverge), so two actions whose frames are identical in every probe are
equivalent on what the probes visited. The classes are an upper bound on the true aliasing (more
probes can only split them); each class's smallest action is its canonical action.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from aclab.envs import make_env

NUM_PROCGEN_ACTIONS = 15


class NondeterministicEnvError(RuntimeError):
    """Copies of one level given the same actions showed different frames."""


@functools.lru_cache(maxsize=64)
def procgen_action_classes(game: str, distribution_mode: str = "easy", levels: Sequence[int] = tuple(range(6)),
                           prefix_lengths: Sequence[int] = (3, 17, 41), horizon: int = 3,
                           seed: int = 0) -> tuple[tuple[int, ...], ...]:
    """The partition of Procgen's 15 actions into classes with identical effects in ``game``.

    Probes: every level of ``levels`` x every prefix length (random prefixes from ``seed``), each followed
    by one action and ``horizon - 1`` shared random actions. Returns the classes sorted by their smallest
    member, each sorted (``((0,), (1,), ..., (4, 9, 10, 11, 12, 13, 14), ...)`` for BigFish). Raises
    :class:`NondeterministicEnvError` if the env does not replay deterministically.
    """
    rng = np.random.default_rng(seed)
    n = NUM_PROCGEN_ACTIONS
    signatures: list[list[bytes]] = [[] for _ in range(n)]
    longest = max(prefix_lengths)
    for level in levels:
        probes = len(prefix_lengths)
        envs = make_env(f"procgen:{game}", n * probes, seed, options={
            "distribution_mode": distribution_mode, "num_levels": 1, "start_level": int(level)})
        try:
            envs.reset()
            # env p * n + a: prefix p's actions, then action a, then the shared tail
            plans = np.zeros((longest + horizon, n * probes), dtype=np.int64)
            for p, length in enumerate(prefix_lengths):
                prefix = rng.integers(0, n, size=length)
                tail = rng.integers(0, n, size=horizon - 1)
                columns = slice(p * n, (p + 1) * n)
                plans[:length, columns] = prefix[:, None]
                plans[length, columns] = np.arange(n)
                plans[length + 1:length + horizon, columns] = tail[:, None]
            frames = [envs.obs.copy()]
            for t in range(longest + horizon):
                frames.append(envs.step(plans[t]).obs.copy())
        finally:
            envs.close()
        for p, length in enumerate(prefix_lengths):
            before = frames[length][p * n:(p + 1) * n]
            if not (before == before[:1]).all():
                raise NondeterministicEnvError(f"procgen:{game} level {level}: identical action prefixes gave "
                                               "different frames; action classes need deterministic replay")
            for a in range(n):
                seen = [frames[length + 1 + k][p * n + a].tobytes() for k in range(horizon)]
                signatures[a].append(b"".join(seen))
    groups: dict[tuple[bytes, ...], list[int]] = {}
    for a in range(n):
        groups.setdefault(tuple(signatures[a]), []).append(a)
    return tuple(sorted(tuple(sorted(g)) for g in groups.values()))


def canonical_actions(classes: Sequence[Sequence[int]], num_actions: int = NUM_PROCGEN_ACTIONS) -> np.ndarray:
    """``[num_actions]`` int64: each action's class representative (the class's smallest action)."""
    out = np.arange(num_actions, dtype=np.int64)
    for group in classes:
        out[list(group)] = min(group)
    return out
