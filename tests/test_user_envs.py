"""Your own environments: Gymnasium's ``gym:module:EnvId`` form, ``env.imports``, env factories. The user
module lives outside the package (in the test's folder); every later command (resume, eval, analyze,
report) must find the env again from the run's config.json alone, as a fresh process would."""

from __future__ import annotations

import json
import sys
import uuid

import gymnasium
import numpy as np
import pytest

from aclab.cli import main
from aclab.envs import EnvIdError, build_envs, make_env, parse_env_id, register_env_factory
from aclab.envs import registry as env_registry
from aclab.train import load_run_config, make_config, resume_config, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CORRIDOR = '''
import gymnasium as gym
import numpy as np


class Corridor(gym.Env):
    """Walk right to the end of ``length`` cells: reward 1 at the end."""

    def __init__(self, length=4):
        self.length = length
        self.observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.pos = max(0, self.pos + (1 if int(action) == 1 else -1))
        done = self.pos >= self.length
        return np.array([self.pos / self.length], np.float32), float(done), done, False, {}


def make(length=4):
    return gym.wrappers.TimeLimit(Corridor(length), 20)


gym.register("ENV_ID", entry_point=Corridor, max_episode_steps=20)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module ``corridor_<hex>`` in the current directory (not on sys.path) registering ``Corridor<hex>-v0``.

    ``forget()`` undoes the import and the registration, as a new process would start."""
    tag = uuid.uuid4().hex[:8]
    name, env_id = f"corridor_{tag}", f"Corridor{tag}-v0"
    (tmp_path / f"{name}.py").write_text(CORRIDOR.replace("ENV_ID", env_id))
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)

    def forget():
        sys.modules.pop(name, None)
        gymnasium.registry.pop(env_id, None)
        env_registry._LOCAL_FACTORIES.clear()

    class Module:
        pass

    module = Module()
    module.name, module.env_id, module.forget, module.dir = name, env_id, forget, tmp_path
    yield module
    forget()
    sys.path[:] = path_before


FAST = ["--total-steps", "512", "--quiet", "--set", "env.num_envs=2", "--set", "params.num_steps=64",
        "--set", "eval.episodes=2", "--set", "checkpoint_every_iterations=2"]


def test_gym_module_form_trains_and_every_later_command_finds_the_env(user_module, capsys):
    run = user_module.dir / "run"
    env = f"gym:{user_module.name}:{user_module.env_id}"
    assert main(["train", "ppo", "--env", env, "--run-dir", str(run), *FAST]) == 0
    assert json.loads((run / "config.json").read_text())["env"]["id"] == env

    user_module.forget()  # a new process: neither the module nor its id is known
    assert main(["eval", str(run), "--episodes", "3"]) == 0
    assert "over 3 episodes" in capsys.readouterr().out

    user_module.forget()
    assert main(["train", "--resume", str(run), "--total-steps", "768", "--quiet"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 768

    user_module.forget()
    assert main(["analyze", "value-bias", str(run), "--episodes", "2", "--device", "cpu"]) == 0
    user_module.forget()
    assert main(["report", str(run), "--out", str(user_module.dir / "report"), "--reps", "20"]) == 0
    assert env in (user_module.dir / "report" / "report.md").read_text()


def test_env_imports_are_saved_and_restored(user_module, capsys):
    """A bare id registered by a module named in env.imports (--import): load_run_config imports it again."""
    run = user_module.dir / "run"
    assert main(["train", "ppo", "--env", user_module.env_id, "--import", user_module.name,
                 "--run-dir", str(run), *FAST]) == 0
    saved = json.loads((run / "config.json").read_text())["env"]
    assert saved["id"] == user_module.env_id and saved["imports"] == [user_module.name]

    user_module.forget()
    with pytest.raises(EnvIdError, match="not a registered Gymnasium id"):
        parse_env_id(user_module.env_id)
    config = load_run_config(run)  # imports the module: the id is registered again
    assert parse_env_id(config.env.id) == ("gym", user_module.env_id)

    user_module.forget()
    config = resume_config(run, ["total_steps=768"])
    assert train(config, run, resume=True)["status"] == "finished"


def test_env_imports_from_python_overrides(user_module):
    config = make_config("ppo", user_module.env_id, overrides={"env.imports": [user_module.name]})
    assert config.env.imports == [user_module.name] and config.preset == "ppo-classic"
    user_module.forget()
    envs = build_envs(config, num_envs=1)  # imports again
    assert envs.spec.num_actions == 2
    envs.close()


def test_factory_by_import_path_passes_env_options(user_module):
    """'factory:<module>:<function>' builds the env object with env.options as keyword arguments."""
    envs = make_env(f"factory:{user_module.name}:make", 2, 0, options={"length": 2})
    envs.reset()
    lengths = []
    for _ in range(10):
        result = envs.step(np.ones(2, dtype=np.int64))  # always right: the corridor's length in steps
        lengths += result.episode_length[result.episode_length > 0].tolist()
    envs.close()
    assert lengths and set(lengths) == {2}
    with pytest.raises(EnvIdError, match="do not fit the factory's arguments"):
        make_env(f"factory:{user_module.name}:make", 1, 0, options={"size": 2})


def test_train_with_an_env_factory_from_python(user_module):
    """train(config, dir, env_factory=f): an importable function is saved by path (the CLI can evaluate
    the run); a lambda works in this process and later commands say clearly why they cannot rebuild it."""
    env_registry.import_env_modules([user_module.name])
    module = sys.modules[user_module.name]
    config = make_config("ppo", env_factory=module.make, overrides=["total_steps=256", "progress=false",
                                                                    "eval.episodes=2", "env.num_envs=2"])
    assert config.env.id == f"factory:{user_module.name}:make"
    assert train(config, user_module.dir / "a")["status"] == "finished"
    user_module.forget()
    assert main(["eval", str(user_module.dir / "a"), "--episodes", "2"]) == 0

    config = make_config("ppo", "CartPole-v1", overrides=["total_steps=256", "progress=false", "eval.episodes=2",
                                                          "env.num_envs=2"])
    summary = train(config, user_module.dir / "b", env_factory=lambda: module.make(3))
    assert summary["status"] == "finished" and summary["env_id"].startswith("factory:")
    assert register_env_factory(lambda: 0).startswith(f"factory:{__name__}:")
    user_module.forget()  # a new process cannot import a lambda
    with pytest.raises(EnvIdError, match="cannot be imported here"):
        build_envs(load_run_config(user_module.dir / "b"))
