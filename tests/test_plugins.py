"""A user's own model family and loss, in their own package, used with no change to AudioRL."""

import sys
import textwrap

import pytest

import audiorl
from audiorl.config import RunConfig
from audiorl.errors import ConfigError

PACKAGE = {
    "my_asr_ext/__init__.py": "",
    "my_asr_ext/adapters.py": '''
        from audiorl.models.whisper import WhisperAdapter

        class ShoutingWhisper(WhisperAdapter):
            """A Whisper whose transcripts come out in capitals (a stand-in for a real new family)."""
            family = "shouting_whisper"

            def decode(self, token_ids):
                return [t.upper() for t in super().decode(token_ids)]
    ''',
    "my_asr_ext/losses.py": '''
        import torch.nn.functional as F

        def wide_margin(pairs):
            """Sigmoid DPO that only stops pushing once the margin exceeds 2 (per pair)."""
            return F.softplus(2.0 - pairs.beta * pairs.delta)
    ''',
    "my_asr_ext/wrong.py": '''
        def two_argument_loss(pairs, margin):
            return pairs.delta * margin

        def reward_without_kwargs(completions):
            return [0.0 for _ in completions]

        def reward_needing_a_lexicon(completions, *, lexicon, **kwargs):
            return [float(len(lexicon)) for _ in completions]

        not_a_function = 3
    ''',
    "my_asr_ext-0.1.dist-info/METADATA": "Metadata-Version: 2.1\\nName: my-asr-ext\\nVersion: 0.1\\n",
    "my_asr_ext-0.1.dist-info/entry_points.txt": """
        [audiorl.model_families]
        shouting = my_asr_ext.adapters:ShoutingWhisper

        [audiorl.losses]
        wide_margin = my_asr_ext.losses:wide_margin
    """,
}


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    for name, text in PACKAGE.items():
        path = tmp_path / "site" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).replace("\\\\n", "\\n").lstrip())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield
    for module in [m for m in sys.modules if m.startswith("my_asr_ext")]:
        del sys.modules[module]


def _config(tmp_path, tiny_whisper, speech_dir, family, loss):
    return RunConfig.model_validate(
        {
            "model": {"family": family, "name_or_path": str(tiny_whisper)},
            "data": {"train": str(speech_dir / "pairs.jsonl"), "eval": str(speech_dir / "transcripts.jsonl"), "max_audio_seconds": 5},
            "objective": {"loss_type": [loss, "sft"], "beta": 0.5},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 6, "learning_rate": 1e-3,
                      "logging_steps": 1, "save_steps": None, "generation_max_new_tokens": 5, "per_device_eval_batch_size": 12},
            "tracking": {"enabled": True},
        }
    )


@pytest.mark.parametrize(
    "family,loss",
    [("my_asr_ext.adapters:ShoutingWhisper", "my_asr_ext.losses:wide_margin"), ("shouting", "wide_margin")],
    ids=["module-path", "entry-points"],
)
def test_user_family_and_loss_train_and_evaluate(user_package, tmp_path, tiny_whisper, speech_dir, family, loss):
    cfg = _config(tmp_path, tiny_whisper, speech_dir, family, loss)
    outcome = audiorl.train(cfg)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    values = [m.value for m in client.get_metric_history(outcome.run_id, f"loss/{loss}")]
    assert len(values) == 2 and values[0] == pytest.approx(2.1269, abs=1e-3)  # softplus(2) with a zero margin at step 1
    artifact = client.download_artifacts(outcome.run_id, "eval/step-000002.json", str(tmp_path))
    import json

    hypotheses = [u["hypothesis"] for u in json.load(open(artifact))["utterances"]]
    assert all(h == h.upper() for h in hypotheses)  # the user's decode() was used


def test_unknown_plugins_fail_clearly(user_package, tmp_path, tiny_whisper, speech_dir):
    with pytest.raises(ValueError, match="unknown loss_type"):
        _config(tmp_path, tiny_whisper, speech_dir, "whisper", "no_such_loss")
    cfg = _config(tmp_path, tiny_whisper, speech_dir, "my_asr_ext.adapters:Missing", "sigmoid")
    with pytest.raises(ConfigError, match="has no 'Missing'"):
        audiorl.train(cfg)
    cfg = _config(tmp_path, tiny_whisper, speech_dir, "my_asr_ext.losses:wide_margin", "sigmoid")
    with pytest.raises(ConfigError, match="not a subclass of audiorl.models.ModelAdapter"):
        audiorl.train(cfg)


def test_a_plugin_with_the_wrong_signature_is_refused_by_name(user_package):
    """A loss or reward that cannot be called the way AudioRL calls it is a config error naming
    the key, the function and the expected call, before any step runs."""
    from audiorl.methods.dpo import custom_losses
    from audiorl.rewards import build_reward

    with pytest.raises(ConfigError, match=r"objective.loss_type='my_asr_ext.wrong:two_argument_loss'.*cannot be called as \(pairs\)"):
        custom_losses(["sigmoid", "my_asr_ext.wrong:two_argument_loss"])
    with pytest.raises(ConfigError, match=r"objective.loss_type='my_asr_ext.wrong:not_a_function': 3 is not callable"):
        custom_losses(["my_asr_ext.wrong:not_a_function"])
    with pytest.raises(ConfigError, match=r"objective.rewards='my_asr_ext.wrong:reward_without_kwargs'.*has no \*\*kwargs"):
        build_reward([{"name": "wer"}, {"name": "my_asr_ext.wrong:reward_without_kwargs"}])
    # a reward's kwargs are bound too: a required option the config does not give is named
    with pytest.raises(ConfigError, match=r"reward_needing_a_lexicon.*cannot be called.*missing a required argument: 'lexicon'"):
        build_reward([{"name": "my_asr_ext.wrong:reward_needing_a_lexicon"}])
    total, _ = build_reward([{"name": "my_asr_ext.wrong:reward_needing_a_lexicon", "kwargs": {"lexicon": ["a", "b"]}}])(["a"])
    assert list(total) == [2.0]


STRAY = "import pathlib\npathlib.Path('{marker}').touch()\n\ndef score(completions, **columns):\n    return [1.0 for c in completions]\n"


def test_a_stray_module_in_the_working_directory_is_not_imported(tmp_path, monkeypatch):
    """Under `python -m` (and torchrun --module) the working directory is importable: a config
    naming a module that lies there is refused before the module runs."""
    from audiorl.rewards import build_reward

    marker = tmp_path / "stray-ran"
    (tmp_path / "evil_rewards.py").write_text(STRAY.format(marker=marker))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # what python -m does with the working directory
    monkeypatch.delenv("AUDIORL_LOCAL_PLUGINS", raising=False)
    with pytest.raises(ConfigError, match=r"'evil_rewards' would be imported from the working directory .*AUDIORL_LOCAL_PLUGINS=evil_rewards"):
        build_reward([{"name": "evil_rewards:score"}])
    assert not marker.exists() and "evil_rewards" not in sys.modules


def test_a_local_module_named_in_the_allow_list_loads_even_off_the_path(tmp_path, monkeypatch):
    from audiorl.rewards import build_reward

    marker = tmp_path / "allowed-ran"
    (tmp_path / "team_rewards.py").write_text(STRAY.format(marker=marker))
    monkeypatch.chdir(tmp_path)  # the folder is not on sys.path, as in a pod (PYTHONSAFEPATH=1)
    monkeypatch.delenv("AUDIORL_LOCAL_PLUGINS", raising=False)
    with pytest.raises(ConfigError, match=r"cannot import 'team_rewards'.*only when named in AUDIORL_LOCAL_PLUGINS"):
        build_reward([{"name": "team_rewards:score"}])
    monkeypatch.setenv("AUDIORL_LOCAL_PLUGINS", "other, team_rewards")
    try:
        total, _ = build_reward([{"name": "team_rewards:score"}])(["a", "b"])
        assert marker.exists() and list(total) == [1.0, 1.0]
        assert str(tmp_path) not in sys.path  # the folder was on the path for that import only
    finally:
        sys.modules.pop("team_rewards", None)


def test_pods_run_with_the_working_directory_off_the_python_path():
    from audiorl.config import validate_config
    from audiorl.k8s.render import render

    cfg = validate_config({"model": {"name_or_path": "/models/m"}, "data": {"train": "/data/t.jsonl"}})
    for api in ("pytorchjob", "trainjob"):
        job = render(cfg, name="j", run_id="r1", api=api).job
        container = job["spec"]["trainer"] if api == "trainjob" else job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        assert {e["name"]: e.get("value") for e in container["env"]}["PYTHONSAFEPATH"] == "1"
