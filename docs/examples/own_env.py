"""Train on your own Gymnasium environment object (an env factory), then evaluate it from the CLI."""

import gymnasium as gym
import numpy as np

from aclab.train import make_config, train


class Corridor(gym.Env):
    """Walk right to the end of a corridor of ``length`` cells: reward 1 at the end."""

    def __init__(self, length: int = 6, render_mode: str | None = None):
        self.length, self.render_mode = length, render_mode
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

    def render(self):  # an RGB frame for `aclab eval --video`
        frame = np.full((32, 32 * (self.length + 1), 3), 255, np.uint8)
        frame[:, 32 * self.pos: 32 * (self.pos + 1)] = (200, 30, 30)
        return frame


def make_corridor(length: int = 6, render_mode: str | None = None) -> gym.Env:
    """The env factory: a zero-argument call gives one env (env.options become keyword arguments)."""
    return gym.wrappers.TimeLimit(Corridor(length, render_mode), max_episode_steps=50)


def main(run_dir="runs/corridor", total_steps=20_000):
    config = make_config("ppo", env_factory=make_corridor,
                         overrides={"total_steps": total_steps, "env.options": {"length": 6}, "progress": False})
    summary = train(config, run_dir, overwrite=True)
    print(config.env.id, summary["status"], summary["final_return"])
    return summary


if __name__ == "__main__":
    main()
