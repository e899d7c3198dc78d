"""aclab: actor-critic algorithms on Procgen, Atari, MuJoCo, DMC, MetaWorld and classic control.

Importing aclab before torch makes torch's OpenMP worker threads sleep while they wait
(``OMP_WAIT_POLICY=PASSIVE``, unless the variable is already set): with the default (spinning) policy
a second intra-op thread whose core another process holds slows every parallel region down, up to
several-fold; with passive waiting two threads stay within ~10-20% of one thread on a busy
machine (docs/performance.md, "Threads"). See :mod:`aclab.core.threads`.
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:  # OpenMP reads it when torch loads its runtime
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
