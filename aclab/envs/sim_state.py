"""Exact save and restore of single Gymnasium envs whose simulator cannot simply be pickled.

Gymnasium's MuJoCo envs pickle by their constructor arguments (``EzPickle``): unpickling builds a fresh
env, so the simulator state is lost. Here each layer of the wrapper chain is saved on its own:

* the MuJoCo env: its whole ``MjData`` (positions, velocities, actuator activations, time, the solver's
  warm start and the derived quantities that an env may read before its next ``mj_step``, e.g. a body
  position for a velocity reward), restored with ``mujoco.mj_copyData`` into the env's own ``data``,
  plus every other attribute (the env's ``np_random``, task parameters) pickled;
* every wrapper (TimeLimit's step counter, OrderEnforcing, ...): its attributes except the inner env.

A continued env then produces bit for bit the observations, rewards and resets of the original one (tested
for Hopper, HalfCheetah, Ant and Humanoid). Chains with any other ``EzPickle`` layer, or an attribute that
cannot be pickled, are not supported (:func:`capture` returns None).
"""

from __future__ import annotations

import pickle
import zlib
from typing import Any

_MUJOCO_SKIP = frozenset({"model", "data", "mujoco_renderer", "_ezpickle_args", "_ezpickle_kwargs"})


def _layers(env: Any) -> list[Any]:
    layers = [env]
    while hasattr(layers[-1], "env") and len(layers) < 64:
        layers.append(layers[-1].env)
    return layers


def _is_mujoco(layer: Any) -> bool:
    try:
        import mujoco
    except ImportError:
        return False
    return isinstance(getattr(layer, "model", None), mujoco.MjModel) and isinstance(
        getattr(layer, "data", None), mujoco.MjData)


def supports(env: Any) -> bool:
    """Whether :func:`capture` can save ``env``: its base is a MuJoCo env and no other layer is EzPickle."""
    from gymnasium.utils import EzPickle

    layers = _layers(env)
    return _is_mujoco(layers[-1]) and not any(isinstance(layer, EzPickle) for layer in layers[:-1])


def capture(env: Any) -> bytes | None:
    """The full state of ``env`` as bytes (zlib-compressed), or None when it cannot be saved exactly."""
    if not supports(env):
        return None
    states = []
    try:
        for layer in _layers(env):
            if _is_mujoco(layer):
                attrs = {k: v for k, v in vars(layer).items() if k not in _MUJOCO_SKIP}
                states.append({"mjdata": pickle.dumps(layer.data), "attrs": pickle.dumps(attrs)})
            else:
                states.append({"attrs": pickle.dumps({k: v for k, v in vars(layer).items() if k != "env"})})
    except Exception:  # noqa: BLE001 - an unpicklable attribute: no exact state
        return None
    return zlib.compress(pickle.dumps({"layers": [type(layer).__name__ for layer in _layers(env)],
                                       "states": states}), 1)


def restore(env: Any, blob: bytes) -> bool:
    """Put ``env`` (built like the captured one) into the captured state; False if the chains differ."""
    import mujoco

    payload = pickle.loads(zlib.decompress(blob))
    layers = _layers(env)
    if payload["layers"] != [type(layer).__name__ for layer in layers]:
        return False
    for layer, state in zip(layers, payload["states"]):
        if "mjdata" in state:
            mujoco.mj_copyData(layer.data, layer.model, pickle.loads(state["mjdata"]))
        vars(layer).update(pickle.loads(state["attrs"]))
    return True
