"""Config resolution, presets, overrides and their error messages."""

import pytest

from aclab.algos.ppo import PPOConfig
from aclab.config import (
    Config,
    ConfigError,
    coerce,
    config_from_dict,
    list_presets,
    load_preset,
    parse_override,
    set_key,
)
from aclab.train import make_config


def test_presets_load_and_validate():
    presets = list_presets()
    assert {"ppo-classic", "ppo-mujoco", "ppo-procgen", "ppo-atari"} <= set(presets)
    for name in presets:
        _, table = load_preset(name)
        config = make_config(table["algo"], preset=name)
        assert config.preset == name


def test_procgen_preset_matches_dcpg_table_2():
    config = make_config("ppo", "procgen:coinrun", "ppo-procgen")
    p = config.params
    assert (p.gamma, p.gae_lambda, p.num_steps, p.num_epochs, p.num_minibatches) == (0.999, 0.95, 256, 3, 8)
    assert (p.ent_coef, p.clip_coef, p.lr, p.max_grad_norm) == (0.01, 0.2, 5e-4, 0.5)
    assert config.env.num_envs == 64 and config.env.normalize_reward and config.env.reward_gamma == 0.99
    assert config.total_steps == 25_000_000 and p.encoder == "impala"
    assert config.env.id == "procgen:coinrun"


def test_default_preset_follows_env_family():
    assert make_config("ppo", "CartPole-v1").preset == "ppo-classic"
    assert make_config("ppo", "Pendulum-v1").preset == "ppo-mujoco"


def test_overrides_dotted_and_bare():
    config = make_config("ppo", "CartPole-v1", overrides=["lr=1e-3", "env.num_envs=8", "seed=3",
                                                          "params.hidden_sizes=[32,32]", "anneal_lr=false"])
    assert config.params.lr == 1e-3
    assert config.env.num_envs == 8
    assert config.seed == 3
    assert config.params.hidden_sizes == (32, 32)
    assert config.params.anneal_lr is False


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("lrr=1", "unknown config key 'lrr'"),
        ("params.lr=abc", "params.lr='abc': expected a finite number"),
        ("params.lr=-1", "params.lr=-1.0: expected a number > 0"),
        ("params.norm_adv=sometimes", "expected one of 'minibatch', 'batch', 'off'"),
        ("env.num_envs=0", "env.num_envs=0"),
        ("device=tpu", "expected one of 'auto', 'cpu', 'cuda'"),
        ("foo.bar=1", "unknown config section 'foo'"),
        ("novalue", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key_and_choices(override, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        make_config("ppo", "CartPole-v1", overrides=[override])
    assert fragment in str(info.value)


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as info:
        make_config("ppo", "CartPole-v1", overrides=["params.clip_cof=0.1"])
    message = str(info.value)
    assert "did you mean 'clip_coef'" in message and "valid keys:" in message


def test_unknown_algorithm_and_preset():
    with pytest.raises(ConfigError, match="unknown algorithm 'ppp'.*valid algorithms: ppo"):
        make_config("ppp", "CartPole-v1")
    with pytest.raises(ConfigError, match="unknown preset 'ppo-clasic'.*did you mean 'ppo-classic'"):
        make_config("ppo", "CartPole-v1", preset="ppo-clasic")


def test_coerce_types():
    assert coerce("k", "1e3", int) == 1000
    assert coerce("k", "3", float) == 3.0
    assert coerce("k", "none", float | None) is None
    assert coerce("k", "[1, 2]", tuple[int, ...]) == (1, 2)
    assert coerce("k", "64,64", tuple[int, ...]) == (64, 64)
    with pytest.raises(ConfigError):
        coerce("k", "1.5", int)
    with pytest.raises(ConfigError):
        coerce("k", "maybe", bool)


def test_round_trip_through_dict():
    config = make_config("ppo", "CartPole-v1", overrides=["lr=1e-3", "params.target_kl=0.02"])
    rebuilt = config_from_dict(config.to_dict(), PPOConfig)
    assert rebuilt == config


def test_parse_override_and_set_key():
    config = Config(params=PPOConfig())
    key, value = parse_override("params.gamma=0.9")
    set_key(config, key, value)
    assert config.params.gamma == 0.9


def test_dotted_overrides_reach_nested_tables():
    config = make_config("ppo", "procgen:bigfish", overrides=[
        "env.options.levels=test", "env.options.num_levels=10", "env.options.start_level=5",
        "env.options.use_backgrounds=false"])
    options = config.env.options
    assert options["levels"] == "test" and options["num_levels"] == 10 and options["start_level"] == 5
    assert options["use_backgrounds"] is False
    assert options["distribution_mode"] == "easy"  # the preset's other entries are kept
    assert make_config("ppo", "procgen:bigfish").env.options.get("num_levels") is None  # presets not mutated
    deeper = make_config("ppo", "CartPole-v1", overrides=["env.options.wrapper.size=3"])
    assert deeper.env.options == {"wrapper": {"size": 3}}


@pytest.mark.parametrize("override, fragment", [
    ("env.num_envs.x=1", "env.num_envs is a value, not a table"),
    ("params.lr.x=1", "params.lr is a value, not a table"),
    ("env.bogus.x=1", "unknown config key 'env.bogus'"),
])
def test_dotted_overrides_into_values_fail_clearly(override, fragment):
    with pytest.raises(ConfigError) as info:
        make_config("ppo", "CartPole-v1", overrides=[override])
    assert fragment in str(info.value)
