"""The methods package: one module per objective, looked up by name; the run schema's objective
section is one class per method."""

import itertools
import re
from pathlib import Path

import pytest

from audiorl.config import validate_config
from audiorl.errors import ConfigError
from audiorl.methods import METHODS, method_for

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_objective_name_picks_the_methods_own_section(name):
    cfg = validate_config({"model": {"name_or_path": "m"}, "objective": {"name": name}})
    assert type(cfg.objective) is METHODS[name].config
    assert method_for(cfg.objective) is METHODS[name]


def test_a_method_has_its_own_defaults():
    dpo = validate_config({"model": {"name_or_path": "m"}}).objective
    grpo = validate_config({"model": {"name_or_path": "m"}, "objective": {"name": "grpo"}}).objective
    assert dpo.name == "dpo" and dpo.beta == 0.1 and dpo.loss_type == ["sigmoid"]
    assert grpo.beta == 0.0 and grpo.loss_type == "dapo"  # TRL's GRPO defaults, not the DPO family's


@pytest.mark.parametrize("own, other", list(itertools.permutations(sorted(METHODS), 2)))
def test_a_knob_of_another_method_is_an_error_naming_the_key_and_its_method(own, other):
    foreign = sorted(set(METHODS[other].config.model_fields) - set(METHODS[own].config.model_fields))
    for key in foreign:
        with pytest.raises(ConfigError, match=rf"run.yaml: invalid config: objective\.{key}: not a knob of "
                                              rf"objective\.name={own} \(it belongs to [^)]*objective\.name={other}"):
            validate_config({"model": {"name_or_path": "m"}, "objective": {"name": own, key: None}}, "run.yaml")


def test_an_unknown_method_lists_the_methods():
    with pytest.raises(ConfigError, match=r"objective: objective.name must be one of \['cpo', 'dpo', 'grpo', 'kto', 'mwer', 'orpo', 'sft'\]"):
        validate_config({"model": {"name_or_path": "m"}, "objective": {"name": "simpo"}})


def test_grpo_takes_one_loss_type():
    grpo = {"name": "grpo", "loss_type": ["dr_grpo"]}
    assert validate_config({"model": {"name_or_path": "m"}, "objective": grpo}).objective.loss_type == "dr_grpo"
    with pytest.raises(ConfigError, match=r"objective.loss_type: .*GRPO takes one loss_type"):
        validate_config({"model": {"name_or_path": "m"}, "objective": {"name": "grpo", "loss_type": ["grpo", "dapo"]}})


def test_only_the_methods_branch_on_the_objective():
    # an `objective.name == ...` test, or a name compared with a method's, anywhere but in the
    # methods package itself
    package = REPO / "audiorl"
    pattern = re.compile(r"objective\.name\s*(==|!=|\bin\b)|name\s*(==|!=)\s*[\"'](dpo|grpo|sft)[\"']|[\"'](dpo|grpo|sft)[\"']\s*(==|!=)\s*\w*name")
    offenders = [
        f"{file.relative_to(REPO)}:{number}: {line.strip()}"
        for file in sorted(package.rglob("*.py")) + sorted((REPO / "cli").rglob("*.py"))
        if package / "methods" not in file.parents
        for number, line in enumerate(file.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
