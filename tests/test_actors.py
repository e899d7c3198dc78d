"""Actor-learner plumbing: trajectory windows, flags and statistics; thread / process / Ray actors produce
exactly the chunks of the in-process collector (results depend on the mode only through the lag);
asynchronous runs end to end through the training loop."""

import dataclasses
import gc
import importlib.util
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from aclab import registry
from aclab.algos.impala import flat_state, make_acting_policy
from aclab.data.actors import (
    ACTOR_SEED_STRIDE,
    ActorFailureLimit,
    ActorWorker,
    Chunk,
    FailureBudget,
    LocalActorPool,
    RayActorPool,
    TrajectoryCollector,
    concat_chunks,
    make_actor_specs,
)
from aclab.envs import make_env
from aclab.runs import load_latest_checkpoint
from aclab.train import make_config, train

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'aclab[ray]')")


class RandomPolicy:
    """Uniform random actions from its own generator; with ``state_size = 1`` the state counts steps since the
    episode started (reset where ``first``), and every state seen before a step is recorded."""

    def __init__(self, seed: int, state_size: int = 0):
        self.rng = np.random.default_rng(seed)
        self.state_size = state_size
        self.states_seen: list[np.ndarray] = []

    def act(self, obs, first, state):
        actions = self.rng.integers(0, 2, size=obs.shape[0])
        if state is not None:
            self.states_seen.append(state.copy())
            state = state * (~first)[:, None] + 1.0
        return actions, actions, np.full(obs.shape[0], np.log(0.5), np.float32), state

    def load_flat_params(self, flat):
        pass


def _cartpole(num_envs: int, seed: int, max_steps: int = 7):
    envs = make_env(
        "CartPole-v1", num_envs, seed, backend="gymnasium", options={"max_episode_steps": max_steps}
    )
    envs.reset(seed=seed)
    return envs


def _collector(num_envs: int, num_steps: int, overlap: int, state_size: int = 0) -> TrajectoryCollector:
    return TrajectoryCollector(num_envs, (4,), np.float32, num_steps, overlap, (), np.int64, state_size)


@pytest.mark.parametrize("overlap", [0, 2])
def test_windows_flags_and_episode_statistics(overlap):
    T, B = 6, 3
    envs = _cartpole(B, seed=3)
    collector = _collector(B, T, overlap)
    policy = RandomPolicy(0)
    chunks = [collector.collect(envs, policy, version=k) for k in range(8)]

    assert chunks[0].env_steps == T * B and all(c.env_steps == (T - overlap) * B for c in chunks[1:])
    assert chunks[0].first[0].all()
    for c in chunks:
        np.testing.assert_array_equal(c.first[1:], ~c.valid)  # a dummy step returns a first observation
        ended_before = c.ends[:-1]
        assert not c.valid[1:][ended_before].any()  # the step after an episode end is a dummy
    assert sum(c.ends.sum() for c in chunks) >= 6  # episodes last at most 7 steps
    for prev, nxt in zip(chunks, chunks[1:]):
        for name in ("actions", "behaviour_log_probs", "rewards", "terminated", "ends", "valid", "versions"):
            np.testing.assert_array_equal(getattr(nxt, name)[:overlap], getattr(prev, name)[T - overlap :])
        np.testing.assert_array_equal(nxt.obs[: overlap + 1], prev.obs[T - overlap :])
        assert (nxt.versions[overlap:] == prev.versions[-1] + 1).all()

    # Episode statistics from the new steps only equal those of replaying the same actions.
    reference = _cartpole(B, seed=3)
    returns, lengths = [], []
    for i, c in enumerate(chunks):
        start = 0 if i == 0 else overlap
        for t in range(start, T):
            result = reference.step(c.actions[t])
            done = result.episode_length > 0
            returns.extend(result.episode_return[done])
            lengths.extend(result.episode_length[done])
    np.testing.assert_allclose(np.concatenate([c.episode_returns for c in chunks]), returns)
    np.testing.assert_array_equal(np.concatenate([c.episode_lengths for c in chunks]), lengths)
    assert max(lengths) <= 7 and len(lengths) > 5


def test_recurrent_state_at_window_start():
    T, B, overlap = 5, 2, 3
    envs = _cartpole(B, seed=1, max_steps=4)
    collector = _collector(B, T, overlap, state_size=1)
    policy = RandomPolicy(1, state_size=1)
    chunks = [collector.collect(envs, policy, version=0) for _ in range(4)]
    seen = np.stack(policy.states_seen)  # [steps, B, 1]: state before each env step
    np.testing.assert_array_equal(chunks[0].core_state, np.zeros((B, 1)))
    for k in range(1, 4):
        window_start = T + (k - 1) * (T - overlap) - overlap  # global index of the window's first step
        np.testing.assert_array_equal(chunks[k].core_state, seen[window_start])
    # The counter restarts at every first observation: the state never exceeds the episode length.
    assert seen.max() <= 5


def test_collector_state_dict_resumes_exactly():
    T, B, overlap = 6, 2, 2
    envs_a, envs_b = _cartpole(B, seed=4), _cartpole(B, seed=4)
    a, b = _collector(B, T, overlap), _collector(B, T, overlap)
    policy_a, policy_b = RandomPolicy(2), RandomPolicy(2)
    for _ in range(3):
        a.collect(envs_a, policy_a, 0)
        b.collect(envs_b, policy_b, 0)
    restored = _collector(B, T, overlap)
    restored.load_state_dict(b.state_dict())
    next_a, next_b = a.collect(envs_a, policy_a, 1), restored.collect(envs_b, policy_b, 1)
    for name in ("obs", "actions", "rewards", "valid", "first", "versions"):
        np.testing.assert_array_equal(getattr(next_a, name), getattr(next_b, name))


def test_concat_chunks_stacks_envs_and_sums_steps():
    envs_a, envs_b = _cartpole(2, seed=5), _cartpole(3, seed=6)
    a = _collector(2, 4, 0).collect(envs_a, RandomPolicy(0), 7)
    b = _collector(3, 4, 0).collect(envs_b, RandomPolicy(1), 9)
    merged = concat_chunks([a, b])
    assert merged.num_envs == 5 and merged.env_steps == a.env_steps + b.env_steps
    np.testing.assert_array_equal(merged.obs[:, 2:], b.obs)
    np.testing.assert_array_equal(merged.versions, np.concatenate([a.versions, b.versions], axis=1))
    assert merged.episode_returns.size == a.episode_returns.size + b.episode_returns.size


# ----------------------------------------------------------------------------------------------
# Remote actors produce exactly the in-process chunks
# ----------------------------------------------------------------------------------------------
def _impala_config(*extra):
    return make_config(
        "impala",
        "CartPole-v1",
        overrides=[
            "progress=false",
            "eval.episodes=0",
            "env.backend=gymnasium",
            "env.num_envs=4",
            "params.num_steps=8",
            "params.hidden_sizes=[16]",
            "params.head_hidden=0",
            "env.normalize_obs=false",
            "env.normalize_reward=false",
            *extra,
        ],
    )


def _parameter_versions(config, count: int) -> list[np.ndarray]:
    """Distinct flat parameter vectors (version k = a net initialised with seed k)."""
    from aclab.algos.impala import build_network
    from aclab.envs import build_envs

    envs = build_envs(config, num_envs=1)
    out = []
    for k in range(count):
        torch.manual_seed(100 + k)
        out.append(flat_state(build_network(config.params, envs.spec)))
    envs.close()
    return out


def _assert_same_chunk(a: Chunk, b: Chunk) -> None:
    for name in (
        "obs",
        "actions",
        "behaviour_log_probs",
        "rewards",
        "terminated",
        "ends",
        "valid",
        "first",
        "versions",
        "episode_returns",
    ):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def _reference(spec, params: list[np.ndarray], versions: list[int]) -> list[Chunk]:
    worker = ActorWorker(spec)
    try:
        return [worker.collect(params[v], v) for v in versions]
    finally:
        worker.close()


def test_each_chunk_acts_with_the_parameters_of_the_version_it_reports():
    """A chunk's behaviour log-probabilities are those of the broadcast parameters of its version, recomputed
    here with a fresh network: an actor that keeps old parameters while reporting a new version fails."""
    from aclab.algos.impala import build_network, load_flat_state

    config = _impala_config()
    params = _parameter_versions(config, 3)
    (spec,) = make_actor_specs(config, make_acting_policy, 1, 2, 8, 0)
    worker = ActorWorker(spec)
    versions = [0, 1, 1, 2]
    try:
        chunks = [worker.collect(params[v], v) for v in versions]
    finally:
        worker.close()
    net = build_network(config.params, worker.envs.spec)
    for version, chunk in zip(versions, chunks):
        assert (chunk.versions == version).all()
        load_flat_state(net, params[version])
        with torch.no_grad():
            for t in range(chunk.num_steps):
                logits, _ = net.step(torch.as_tensor(chunk.obs[t]), torch.as_tensor(chunk.first[t]), None)
                expected = torch.log_softmax(logits, -1).gather(1, torch.as_tensor(chunk.actions[t])[:, None])
                np.testing.assert_allclose(chunk.behaviour_log_probs[t], expected[:, 0].numpy(), rtol=1e-5,
                                           atol=1e-6)


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_local_actor_chunks_equal_in_process_chunks(backend):
    config = _impala_config("params.overlap=3")
    params = _parameter_versions(config, 2)
    (spec,) = make_actor_specs(config, make_acting_policy, 1, 4, 8, 3)
    pool = LocalActorPool([spec], params[0].size, backend=backend, inflight=1)
    try:
        pool.publish(params[0], 0)
        received = [pool.get(timeout=60)]
        pool.publish(params[1], 1)
        received += [pool.get(timeout=60) for _ in range(3)]
    finally:
        pool.close()
    versions = [int(c.versions[-1, 0]) for c in received]
    assert (
        versions[0] == 0 and versions[-1] == 1
    )  # queue of 1: at most two chunks were made before the switch
    for got, expected in zip(received, _reference(spec, params, versions)):
        _assert_same_chunk(got, expected)
    assert not any(w.is_alive() for w in pool.workers)


@pytest.fixture(scope="module")
def ray_runtime():
    if not HAS_RAY:
        pytest.skip("ray is not installed (pip install 'aclab[ray]')")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@needs_ray
def test_ray_actor_chunks_equal_in_process_chunks(ray_runtime):
    config = _impala_config()
    params = _parameter_versions(config, 2)
    specs = make_actor_specs(config, make_acting_policy, 2, 2, 8, 0)
    pool = RayActorPool(specs, inflight=1)
    assert not pool._owns_runtime
    received: list[Chunk] = []
    try:
        pool.wait_ready(timeout=120)  # both start with version 0
        pool.publish(params[0], 0)
        received += [pool.get(timeout=120) for _ in range(2)]
        pool.publish(params[1], 1)
        deadline = time.monotonic() + 120  # an actor may start seconds after the other on a loaded machine
        while time.monotonic() < deadline:  # until both actors sent two chunks and version 1 was used
            counts = [sum(c.actor_id == i for c in received) for i in range(2)]
            if min(counts) >= 2 and any(c.versions[0, 0] == 1 for c in received):
                break
            received.append(pool.get(timeout=120))
    finally:
        pool.close()
    by_actor: dict[int, list[Chunk]] = {0: [], 1: []}
    for chunk in received:
        by_actor[chunk.actor_id].append(chunk)
    for actor_id, chunks in by_actor.items():
        versions = [int(c.versions[0, 0]) for c in chunks]
        assert len(chunks) >= 2 and versions[0] == 0
        for got, expected in zip(chunks, _reference(specs[actor_id], params, versions)):
            _assert_same_chunk(got, expected)
    assert {int(c.versions[0, 0]) for c in received} == {0, 1}  # requests before / after the new broadcast


# ----------------------------------------------------------------------------------------------
# Asynchronous runs end to end
# ----------------------------------------------------------------------------------------------
def _async_run(tmp_path, mode: str, *extra: str) -> dict:
    config = _impala_config(
        f"params.actor_mode={mode}",
        "total_steps=320",
        "checkpoint_every_iterations=0",
        "params.num_actors=2",
        *extra,
    )
    return train(config, tmp_path / mode)


def _metric_rows(run_dir):
    import csv

    return list(csv.DictReader((run_dir / "metrics.csv").open()))


def _record_chunks(monkeypatch) -> list:
    """Record (learner iteration, chunk) for every chunk the learner trains on."""
    from aclab.algos.impala import Impala

    recorded = []
    real = Impala.next_chunk

    def next_chunk(self, envs):
        chunk = real(self, envs)
        recorded.append((self.iteration, chunk.versions.copy(), chunk.valid.copy()))
        return chunk

    monkeypatch.setattr(Impala, "next_chunk", next_chunk)
    return recorded


def _check_policy_lag(rows, recorded, bound: int = 5) -> None:
    """Each row's policy lag is (learner version - acting version) over that batch's real transitions;
    actors load the parameters the learner publishes (lag >= 0), and the chunk's new steps (its last row)
    are at most ``bound`` = params.max_policy_lag updates old: the learner drops older chunks. How far
    below the bound the lag stays depends on the machine's load, so only the bound is asserted."""
    assert len(rows) == len(recorded)
    for row, (iteration, versions, valid) in zip(rows, recorded):
        lag = iteration - versions
        assert float(row["policy_lag_mean"]) == pytest.approx(float(lag[valid].mean()), rel=1e-5)  # CSV: 6 digits
        assert float(row["policy_lag_max"]) == float(lag.max())
        assert lag.min() >= 0 and lag[-1].max() <= bound, lag


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_local_run_end_to_end(tmp_path, mode, monkeypatch):
    recorded = _record_chunks(monkeypatch)
    summary = _async_run(tmp_path, mode, "params.max_pending_per_actor=1", "total_steps=480")
    assert summary["status"] == "finished" and summary["steps"] >= 480
    rows = _metric_rows(tmp_path / mode)
    assert len(rows) == 15
    _check_policy_lag(rows, recorded)
    gc.collect()
    assert not [t for t in threading.enumerate() if t.name.startswith("aclab-actor")]


@needs_ray
def test_ray_run_end_to_end(tmp_path, ray_runtime, monkeypatch):
    recorded = _record_chunks(monkeypatch)
    summary = _async_run(tmp_path, "ray", "params.max_pending_per_actor=1", "total_steps=480")
    assert summary["status"] == "finished" and summary["steps"] >= 480
    rows = _metric_rows(tmp_path / "ray")
    assert len(rows) == 15
    _check_policy_lag(rows, recorded)
    assert ray_runtime.is_initialized()  # the run did not shut down a runtime it did not start


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["thread", "process", "ray"])
def test_async_modes_learn_cartpole(tmp_path, mode):
    if mode == "ray" and not HAS_RAY:
        pytest.skip("ray is not installed")
    config = make_config(
        "impala",
        "CartPole-v1",
        overrides=[
            "progress=false",
            "eval.episodes=0",
            f"params.actor_mode={mode}",
            "total_steps=200000",
            "checkpoint_every_iterations=0",
            "params.ray_num_cpus=2",
            "env.normalize_obs=false",
            "env.normalize_reward=false",
            "params.lr=4e-3",
        ],
    )  # normalisation needs synchronous acting
    summary = train(config, tmp_path / mode)
    assert summary["final_return"] > 150, summary


# ----------------------------------------------------------------------------------------------
# Actors that survive: failures are counted, dead actors replaced, stale chunks dropped
# ----------------------------------------------------------------------------------------------
def test_failure_budget_counts_failures_within_the_window(capsys):
    now = [0.0]
    budget = FailureBudget(limit=3, window_s=10.0, clock=lambda: now[0])
    for t in (0.0, 1.0, 12.0, 13.0):  # never 3 within 10 s
        now[0] = t
        budget.record(0, "Traceback ...\nRuntimeError: boom")
    assert "actor 0 failed (RuntimeError: boom); restarting it" in capsys.readouterr().err
    now[0] = 14.0
    with pytest.raises(ActorFailureLimit, match=r"3 actor failures within 10 s .* actor 1: killed"):
        budget.record(1, "killed")
    assert budget.total == 5


class _FakePool:
    def __init__(self, chunks):
        self.chunks = list(chunks)

    def get(self, timeout):
        return self.chunks.pop(0)


def test_learner_drops_chunks_older_than_the_lag_bound():
    """max_policy_lag: a chunk collected with parameters more than that many updates old never reaches the
    loss; fresher ones do, in arrival order."""
    config = _impala_config("params.actor_mode=thread", "params.max_policy_lag=2")
    algo = registry.build(config, make_env("CartPole-v1", 1, 0, backend="gymnasium").spec, torch.device("cpu"))
    envs = _cartpole(2, seed=0)
    base = _collector(2, 8, 0).collect(envs, RandomPolicy(0), 0)
    chunks = []
    for version in (7, 10, 5, 8, 9):  # learner at 10: lags 3, 0, 5, 2, 1
        chunks.append(dataclasses.replace(base, versions=np.full_like(base.versions, version)))
    algo._pool, algo.iteration = _FakePool(chunks), 10
    batch = algo.next_chunk(None)  # m = 4 envs: two 2-env chunks
    assert batch.num_envs == 4 and sorted(set(batch.versions.ravel())) == [8, 10]
    assert algo.dropped_chunks == 2 and len(algo._pool.chunks) == 1
    algo._pool = None


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _replacement_chunk(pool, actor: int, deadline_s: float = 120.0) -> Chunk:
    """Chunks until one from ``actor``'s second incarnation arrives."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        chunk = pool.get(timeout=deadline_s)
        if chunk.actor_id == actor and chunk.incarnation == 1:
            return chunk
    raise AssertionError("the killed actor was not replaced")


@pytest.mark.parametrize("backend", ["process", "ray"])
def test_killed_actor_is_replaced_with_fresh_seeds_and_current_parameters(request, backend):
    """Kill an actor process by its pid: the pool notices, counts the failure, starts the next incarnation
    (fresh env seeds), which collects with the parameters published after the kill: its first chunk equals
    what an in-process worker of that incarnation makes with those parameters."""
    config = _impala_config()
    params = _parameter_versions(config, 2)
    specs = make_actor_specs(config, make_acting_policy, 2, 2, 8, 0)
    if backend == "ray":
        request.getfixturevalue("ray_runtime")
        pool = RayActorPool(specs, inflight=1)
    else:
        pool = LocalActorPool(specs, params[0].size, backend="process", inflight=1)
    try:
        pool.wait_ready(timeout=120)
        assert pool.stats() == {"actors/alive": 2.0, "actors/restarts": 0.0}
        pids = pool.pids()
        assert len(set(pids)) == 2 and all(pids)
        pool.publish(params[0], 0)
        pool.get(timeout=120)
        _kill(pids[0])
        pool.publish(params[1], 1)
        replacement = _replacement_chunk(pool, 0)
        stats = pool.stats()
        assert stats["actors/restarts"] == 1 and stats["actors/alive"] == 2 and stats["actors/restart_s"] > 0
        assert pool.pids()[0] not in (None, pids[0]) and pool.pids()[1] == pids[1]
    finally:
        pool.close()
    assert (replacement.versions == 1).all()
    (expected,) = _reference(specs[0].restarted(), params, [1])
    _assert_same_chunk(replacement, expected)
    (first_incarnation,) = _reference(specs[0], params, [1])
    assert not np.array_equal(expected.obs, first_incarnation.obs)  # fresh seeds, not a replay


_FAILED_ONCE: list[int] = []


def _fails_once_factory(config, env_spec, seed):
    """A policy whose first instance raises on its second chunk (thread actors share this module)."""
    policy = make_acting_policy(config, env_spec, seed)
    if not _FAILED_ONCE:
        _FAILED_ONCE.append(seed)
        calls = [0]
        act = policy.act

        def failing_act(obs, first, state):
            calls[0] += 1
            if calls[0] > 8:
                raise RuntimeError("injected actor failure")
            return act(obs, first, state)

        policy.act = failing_act
    return policy


def test_thread_actor_that_raises_is_replaced():
    config = _impala_config()
    params = _parameter_versions(config, 1)
    _FAILED_ONCE.clear()
    specs = make_actor_specs(config, _fails_once_factory, 1, 2, 8, 0)
    pool = LocalActorPool(specs, params[0].size, backend="thread", inflight=1)
    try:
        pool.publish(params[0], 0)
        assert pool.get(timeout=60).incarnation == 0
        assert _replacement_chunk(pool, 0, 60).incarnation == 1
        assert pool.stats()["actors/restarts"] == 1 and pool.pids() == [None]
    finally:
        pool.close()


def _killing_run(tmp_path, mode: str, kills: dict[int, int], *extra: str,
                 hold: bool = True) -> tuple[dict, list[dict], list]:
    """A run in which a callback kills actor ``kills[i]`` by pid at iteration ``i``; after the last kill
    it holds the loop until the failures are noticed and the replacement is ready, so that the run ends
    with it (``hold=False``: it only sleeps 2 s per iteration until then, letting the learner's own fetch
    notice them, as a run that stops on too many failures needs)."""
    seen: list = []

    class Killer:
        def on_iteration(self, info):
            seen.append(info.algo.actor_pids())
            if info.iteration in kills:
                _kill(info.algo.actor_pids()[kills[info.iteration]])
            elif info.iteration > max(kills):
                if info.metrics["actors/restarts"] < len(kills) and not hold:
                    time.sleep(2.0)  # the learner notices the failure on its next fetch
                elif info.metrics["actors/restarts"] < len(kills):
                    # receive (and keep) chunks until the pool has seen the failures: Ray reports a killed
                    # actor's failed call after a delay that grows with the load (a fixed 2 s per remaining
                    # iteration let a loaded run end before it, about 1 time in 9)
                    pool, deadline = info.algo._pool, time.monotonic() + 120.0
                    while pool.restarts < len(kills) and time.monotonic() < deadline:
                        chunk = pool._receive(1.0)
                        if chunk is not None:
                            pool._buffer.append(chunk)
                    pool.wait_ready(180.0)  # and for the replacement (below), in case this was the last iteration
                elif info.metrics["actors/alive"] < 2:
                    # block until the replacement is ready, so that the run ends with it (a Ray actor's new
                    # process takes 20-40 s to import and build its envs on a loaded 2-core machine: sleeping a
                    # few seconds per remaining iteration was not always enough in a full test run)
                    info.algo._pool.wait_ready(180.0)

    config = _impala_config(f"params.actor_mode={mode}", "total_steps=1600", "checkpoint_every_iterations=0",
                            "params.num_actors=2", "params.max_policy_lag=3", *extra)
    summary = train(config, tmp_path / mode, callbacks=[Killer()])
    return summary, _metric_rows(tmp_path / mode), seen


@pytest.mark.parametrize("mode", ["process", "ray"])
def test_run_survives_an_actor_killed_by_pid(tmp_path, request, mode):
    """The run finishes, counts the restart, the replacement is alive at the end, and the learner never
    trained on a chunk collected more than max_policy_lag updates earlier."""
    if mode == "ray":
        request.getfixturevalue("ray_runtime")
    summary, rows, pids = _killing_run(tmp_path, mode, {3: 0})
    assert summary["status"] == "finished" and summary["steps"] >= 1600, summary
    assert float(rows[-1]["actors/restarts"]) == 1 and float(rows[-1]["actors/alive"]) == 2
    assert rows[-1]["actors/restart_s"] not in ("", None)
    assert max(float(r["policy_lag_max"]) for r in rows) <= 3
    assert pids[-1][0] != pids[2][0] and pids[-1][1] == pids[2][1]  # actor 0 is a new process


def test_too_many_actor_failures_stop_the_run_failed_with_a_checkpoint(tmp_path):
    summary, rows, _ = _killing_run(tmp_path, "process", {3: 0, 4: 1}, "params.actor_failure_limit=2", hold=False)
    assert summary["status"] == "failed" and "2 actor failures within 300 s" in summary["error"], summary
    checkpoint = load_latest_checkpoint(tmp_path / "process" / "checkpoints")
    assert checkpoint is not None and checkpoint["step"] == summary["steps"] == int(rows[-1]["step"])


@pytest.mark.parametrize("wait", [True, False])
def test_wait_for_actors_starts_learning_when_every_actor_is_ready(tmp_path, monkeypatch, wait):
    """params.wait_for_actors: with it the first update waits for an actor that takes 3 s to build its policy
    (the first metrics row sees both actors alive); without it learning starts on the fast actor's chunks."""
    from aclab.algos import impala

    slow_seed = ACTOR_SEED_STRIDE * 2  # actor 1's env seed offset (make_actor_specs)

    def slow_second_actor(config, env_spec, seed):
        if seed == config.seed + slow_seed:
            time.sleep(3.0)
        return make_acting_policy(config, env_spec, seed)

    monkeypatch.setattr(impala, "make_acting_policy", slow_second_actor)
    config = _impala_config("params.actor_mode=thread", "params.num_actors=2", "total_steps=160",
                            "checkpoint_every_iterations=0", "params.max_policy_lag=None",
                            f"params.wait_for_actors={str(wait).lower()}")
    summary = train(config, tmp_path / "run")
    assert summary["status"] == "finished"
    alive = [float(row["actors/alive"]) for row in _metric_rows(tmp_path / "run")]
    assert alive[0] == (2.0 if wait else 1.0), alive
