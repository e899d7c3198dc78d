"""Watch a run and stop it from Python: print progress, stop once CartPole is solved."""

from aclab.callbacks import Callback, StopOnReturn
from aclab.train import make_config, train


class PrintEvaluations(Callback):
    def on_iteration(self, info):
        if info.iteration % 10 == 0:
            print(f"step {info.step}: loss {info.metrics.get('loss', float('nan')):.3f}")

    def on_evaluation(self, info):
        print(f"step {info.step}: {info.split} return {info.mean_return:.1f} over {len(info.returns)} episodes")

    def on_checkpoint(self, step, path):
        print(f"checkpoint {path.name}")


def main(run_dir="runs/cartpole-callbacks", total_steps=100_000):
    config = make_config("ppo", "CartPole-v1", overrides={"total_steps": total_steps, "eval.every_steps": 10_000,
                                                          "progress": False})
    summary = train(config, run_dir, overwrite=True,
                    callbacks=[PrintEvaluations(), StopOnReturn(threshold=475.0, window=100)])
    print(summary["status"], summary.get("stop_reason", ""), summary["steps"])
    return summary


if __name__ == "__main__":
    main()
