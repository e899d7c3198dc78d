"""The action-equivalence classes of the 16 Procgen games (docs/analysis.md), with default and 10x probes.

    python docs/results/phasic/action_classes.py
"""

from aclab.analysis.action_classes import procgen_action_classes
from aclab.envs.registry import PROCGEN_GAMES

for game in PROCGEN_GAMES:
    default = procgen_action_classes(game)
    more = procgen_action_classes(game, levels=tuple(range(20)), prefix_lengths=(1, 3, 8, 17, 41, 80), horizon=6,
                                  seed=1)
    groups = [list(c) for c in default if len(c) > 1]
    print(f"{game}: {len(default)} distinct, aliased {groups}, {'same' if more == default else more} with more probes")
