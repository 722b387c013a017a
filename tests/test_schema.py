"""The schema of the config (da_runner/schema.py): every key of every shipped config is declared, and
every key refuses a value of the wrong type and one out of its range with one line naming the key,
the rule and the value."""

import pytest
from hydra import compose
from omegaconf import OmegaConf

from conftest import run_cli
from da_runner import schema
from da_runner.config_tree import config_dir, initialize_configs
from da_runner.errors import UserError
from da_runner.rules import NO_RANGE

GROUPS = ("method", "data", "backbone", "grl", "optim", "trainer", "experiment")
FROM_VADA = ["method.init_from=vada_run"]  # DIRT-T (its method and experiments) starts from a VADA run


def shipped_compositions() -> list[list[str]]:
    """The default config, and the default with each option of each group (every experiment included)."""
    options = [[]]
    for group in GROUPS:
        for path in sorted((config_dir() / group).glob("*.yaml")):
            options.append([f"{group}={path.stem}", *(FROM_VADA if "dirt_t" in path.stem else [])])
    return options


with initialize_configs():  # (overrides, composed config) of every shipped composition, composed once
    COMPOSED = [(overrides, compose("config", overrides=overrides)) for overrides in shipped_compositions()]


def test_every_key_of_every_shipped_config_is_declared_and_its_value_allowed():
    seen = set()
    for overrides, cfg in COMPOSED:
        before = OmegaConf.to_yaml(cfg)
        schema.check(cfg)
        assert OmegaConf.to_yaml(cfg) == before  # the schema checks the composition, it never changes it
        for key, value in schema.leaves(cfg):
            assert key in schema.SCHEMA, f"{key} (in {overrides or 'the default'}) has no rule in da_runner/schema.py"
            schema.check_value(key, value)
            seen.add(key)
    unused = set(schema.SCHEMA) - seen
    assert not unused, f"declared but in no shipped config: {sorted(unused)}"


def test_a_key_the_schema_does_not_know_is_refused():
    with initialize_configs():
        cfg = compose("config", overrides=["+method.trade_of=0.1"])
    with pytest.raises(UserError, match=r"method.trade_of is not a key of da-run's config .*got method.trade_of=0.1"):
        schema.check(cfg)


def bad_values():
    """(composition holding the key, key, bad value) for a wrong type and, where the rule has one, an
    out-of-range value of every declared key."""
    cases, first_holder = [], {}
    for overrides, cfg in COMPOSED:
        for key, _ in schema.leaves(cfg):
            first_holder.setdefault(key, overrides)
    for key, overrides in first_holder.items():
        rule = schema.SCHEMA[key].rule
        cases.append((overrides, key, rule.wrong_type()))
        if rule.out_of_range() is not NO_RANGE:
            cases.append((overrides, key, rule.out_of_range()))
    return cases


BAD_VALUES = bad_values()


def test_every_rule_refuses_its_own_bad_values():
    for _, key, value in BAD_VALUES:
        assert not schema.SCHEMA[key].rule.allows(value), (key, value)


@pytest.mark.parametrize("overrides, key, value", BAD_VALUES,
                         ids=[f"{key}={schema.as_override(value)}" for _, key, value in BAD_VALUES])
def test_every_key_refuses_a_wrong_type_and_an_out_of_range_value(overrides, key, value):
    """As the command line gives it: the value goes through Hydra's override parser first."""
    override = f"{key}={schema.as_override(value)}"
    with initialize_configs():
        cfg = compose("config", overrides=[*overrides, override])
    given = schema.describe(OmegaConf.select(cfg, key))
    rule = schema.SCHEMA[key].rule
    with pytest.raises(UserError) as err:
        schema.check(cfg)
    assert str(err.value) == f"{key} must be {rule.text}, got {given}"


@pytest.mark.parametrize("override, message", [
    ("grl.gamma=abc", "grl.gamma must be a number >= 0, got 'abc'"),
    ("seed=-1", "seed must be an integer >= 0, got -1"),
    ("optim.momentum=-1", "optim.momentum must be a number >= 0, got -1"),
    ("data.seed=-3", "data.seed must be an integer >= 0, got -3"),
    ("backbone.domain_head=[0]", "backbone.domain_head must be a list of positive integers, got [0]"),
    ("trainer.validators=[]",
     "trainer.validators must be a non-empty list of source_acc, entropy, im, snd, dev, got []"),
])
def test_a_bad_value_ends_da_run_with_one_line_before_anything_is_written(tmp_path, override, message):
    run_dir = tmp_path / "run"
    result = run_cli([override, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"da-run: error: {message}\n"
    assert {p.name for p in run_dir.iterdir()} <= {".hydra", "cli.log"}  # Hydra's own files, nothing of the run


def test_an_unknown_key_stays_refused_by_hydra(tmp_path):
    result = run_cli(["trainer.max_step=10", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 1 and "trainer.max_step" in result.stderr
    assert not (tmp_path / "run").exists()


def test_help_documents_every_key_of_the_composition(tmp_path):
    result = run_cli(["method=mcd", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "  method.num_k=4\n      a positive integer; MCD: generator updates per iteration" in result.stdout
    assert "  trainer.ema=null\n      null (off) or a decay in (0, 1), e.g. 0.999;" in result.stdout
    with initialize_configs():
        cfg = compose("config", overrides=["method=mcd"])
    for key, _ in schema.leaves(cfg):
        assert f"\n  {key}=" in result.stdout, key
