"""Action-equivalence classes of Procgen games by deterministic replay."""

from __future__ import annotations

import numpy as np
import pytest

from aclab.analysis import action_classes
from aclab.analysis.action_classes import NondeterministicEnvError, canonical_actions, procgen_action_classes

NO_OP_CLASS = (4, 9, 10, 11, 12, 13, 14)


def test_bigfish_has_the_papers_nine_distinct_actions():
    """DCPG paper, F.2: 'there are 9 different actions (8 directional moves and 1 do nothing) in BigFish'."""
    classes = procgen_action_classes("bigfish", levels=(0, 1, 2), prefix_lengths=(3, 17))
    assert classes == ((0,), (1,), (2,), (3,), NO_OP_CLASS, (5,), (6,), (7,), (8,))
    assert canonical_actions(classes).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 4, 4, 4, 4, 4, 4]


def test_leaper_moves_in_four_directions():
    """Leaper (Cobbe et al. 2020) moves up, down, left or right: diagonals act as their horizontal part."""
    classes = procgen_action_classes("leaper", levels=(0, 1, 2), prefix_lengths=(3, 17))
    assert classes == ((0, 1, 2), (3,), NO_OP_CLASS, (5,), (6, 7, 8))


def test_replay_must_be_deterministic(monkeypatch):
    class Noisy:
        """An env whose frames are random: copies given the same actions disagree."""

        def __init__(self, num_envs):
            self.rng = np.random.default_rng(0)
            self.num_envs = num_envs
            self.obs = self.rng.integers(0, 255, (num_envs, 3, 4, 4), dtype=np.uint8)

        def reset(self):
            return self.obs

        def step(self, actions):
            self.obs = self.rng.integers(0, 255, (self.num_envs, 3, 4, 4), dtype=np.uint8)
            return type("Result", (), {"obs": self.obs})()

        def close(self):
            pass

    monkeypatch.setattr(action_classes, "make_env", lambda env_id, num_envs, seed, options: Noisy(num_envs))
    with pytest.raises(NondeterministicEnvError, match="deterministic replay"):
        procgen_action_classes.__wrapped__("bigfish", levels=(0,), prefix_lengths=(2,))
