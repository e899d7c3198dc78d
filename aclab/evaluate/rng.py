"""Evaluation draws on its own random streams, never on the training's.

An algorithm's ``act`` samples from the generators it trains with (``self.generator``, an off-policy
loop's NumPy ``rng``), and env construction or a policy may touch the global RNGs. If an evaluation
consumed those, a run with periodic evaluation would train differently from one without, and a resumed
run would diverge from the uninterrupted one unless every evaluation were repeated. :func:`own_streams`
therefore, for the duration of an evaluation, reseeds every torch / NumPy generator reachable from the
algorithm (its attributes and those of aclab objects it holds, a few levels deep) and the global Python,
NumPy and torch RNGs from one evaluation seed, then puts all of them back exactly as they were.

The evaluation seed is derived from the run's seed, the split and the algorithm's step count
(:func:`evaluation_seed`), so the evaluation at a given step is the same in an uninterrupted run, in a
resumed one and in ``aclab eval`` of that step's checkpoint (with the same episodes and flags).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

EVAL_STREAM_TAG = 0xE7A1  # keeps evaluation seeds apart from every training seed derivation
_MAX_DEPTH = 3


def evaluation_seed(seed: int, split: str, step: int) -> int:
    """A 63-bit seed for the evaluation of ``split`` at ``step`` of a run with ``seed``."""
    split_id = {"train": 1, "test": 2}.get(split, 3)
    state = np.random.SeedSequence([int(seed), EVAL_STREAM_TAG, split_id, int(step)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def _generators(obj: Any, depth: int = 0, seen: set[int] | None = None) -> Iterator[Any]:
    """torch.Generator and np.random.Generator objects reachable from ``obj`` (each once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > _MAX_DEPTH:
        return
    seen.add(id(obj))
    if isinstance(obj, (torch.Generator, np.random.Generator)):
        yield obj
        return
    if isinstance(obj, (list, tuple)):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif type(obj).__module__.startswith("aclab.") and hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return
    for child in children:
        yield from _generators(child, depth + 1, seen)


@contextlib.contextmanager
def own_streams(algo: Any, seed: int) -> Iterator[None]:
    """Within the block every RNG reachable from ``algo`` and the global RNGs draw from streams derived
    from ``seed``; on exit they are restored to their exact previous states."""
    generators = list(_generators(algo))
    saved = [g.get_state() if isinstance(g, torch.Generator) else g.bit_generator.state for g in generators]
    saved_global = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                    torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    children = np.random.SeedSequence(seed).spawn(len(generators) + 1)
    try:
        for g, child in zip(generators, children):
            if isinstance(g, torch.Generator):
                g.manual_seed(int(child.generate_state(1, np.uint64)[0] >> np.uint64(1)))
            else:
                g.bit_generator.state = type(g.bit_generator)(child).state
        global_seed = int(children[-1].generate_state(1, np.uint32)[0])
        random.seed(global_seed)
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        yield
    finally:
        for g, state in zip(generators, saved):
            if isinstance(g, torch.Generator):
                g.set_state(state)
            else:
                g.bit_generator.state = state
        random.setstate(saved_global[0])
        np.random.set_state(saved_global[1])
        torch.set_rng_state(saved_global[2])
        if saved_global[3] is not None:
            torch.cuda.set_rng_state_all(saved_global[3])
