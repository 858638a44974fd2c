"""The README is the manual: its commands and config reference must match the code."""

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from audiorl.config import RunConfig
from audiorl.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _commands():
    return re.findall(r"```bash\n(.+?)\n```", README)


def test_ci_runs_exactly_the_readme_test_command():
    test_commands = [c for c in _commands() if "pytest" in c]
    assert len(test_commands) == 1
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_commands[0] in ci


def test_the_main_job_command_installs_then_runs_quickstart():
    (main_job,) = [c for c in _commands() if "quickstart" in c]
    assert main_job.index("torch==2.13.0") < main_job.index("pip install -e .") < main_job.index("audiorl quickstart")


def _sections(annotation):
    """The schema classes an annotation can hold: itself, the members of a union (the objective
    section is one class per method), through Annotated and Optional."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _sections(arg)]


def _leaf_keys(model: type[BaseModel], prefix=""):
    for name, field in model.model_fields.items():
        nested = _sections(field.annotation)
        if nested:
            for section in nested:
                yield from _leaf_keys(section, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_every_config_key_is_in_the_reference():
    reference = README[README.index("## Config reference") : README.index("## CLI")]
    missing = []
    for key in _leaf_keys(RunConfig):
        section, *rest = key.split(".")
        leaf = rest[-1] if rest else section
        if f"`{leaf}`" not in reference:
            missing.append(key)
    assert not missing, f"undocumented config keys: {missing}"


def test_the_reference_walks_every_method_section():
    sections = {".".join(key.split(".")[:2]) for key in _leaf_keys(RunConfig)}
    for method in METHODS.values():
        assert {f"objective.{name}" for name in method.config.model_fields} <= sections, method.name
