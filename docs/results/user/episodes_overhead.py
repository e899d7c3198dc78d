"""Cost of episodes.csv: PPO on CartPole-v1, 30k steps, logging.episodes on and off, interleaved, 3 runs each.

Run it on a quiet machine; it writes episodes_overhead.json beside it.
"""

import json
import tempfile
from pathlib import Path

from aclab.train import make_config, train


def main(repeats: int = 3, total_steps: int = 30_000) -> dict:
    result = {"episodes_on": [], "episodes_off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for on in (True, False):
                config = make_config("ppo", "CartPole-v1", overrides=[
                    "progress=false", "eval.episodes=0", f"total_steps={total_steps}",
                    f"logging.episodes={str(on).lower()}", "torch_threads=1"])
                summary = train(config, Path(tmp) / f"{on}{rep}")
                result["episodes_on" if on else "episodes_off"].append(summary["steps_per_s"])
    (Path(__file__).parent / "episodes_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    print(main())
