"""Training through the Python API on real speech and a tiny Whisper."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import audiorl
from audiorl.config import RunConfig
from audiorl.errors import TrainingError


def make_config(tmp_path: Path, tiny_whisper: Path, speech_dir: Path, **sections) -> RunConfig:
    base = {
        "model": {"name_or_path": str(tiny_whisper)},
        "data": {"train": str(speech_dir / "pairs.jsonl"), "max_audio_seconds": 5},
        "objective": {"loss_type": ["sigmoid"], "beta": 0.1},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "max_steps": 6,
            "logging_steps": 1,
            "save_steps": 3,
            "save_total_limit": None,
            "resume": "never",
            "num_threads": 1,
        },
        "tracking": {"enabled": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return RunConfig.model_validate(base)


def as_if_killed_after_step_3(cfg: RunConfig) -> None:
    """As if a run of make_config's 6 steps (checkpoints every 3) died after step 3: drop what it
    wrote later, and ask the next run to resume."""
    import shutil

    run_dir = Path(cfg.train.output_dir)
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-6")
    shutil.rmtree(run_dir / "final")
    cfg.train.resume = "auto"


def final_weights(outcome) -> dict[str, torch.Tensor]:
    return load_file(str(outcome.final_model_dir / "model.safetensors"))


def test_dpo_loss_falls_and_chosen_wins_on_a_fixed_batch(tmp_path, tiny_whisper, speech_dir):
    cfg = make_config(
        tmp_path, tiny_whisper, speech_dir,
        objective={"beta": 0.5},
        train={"per_device_train_batch_size": 12, "max_steps": 12, "save_steps": None, "learning_rate": 3e-3},
        tracking={"enabled": True},
    )
    outcome = audiorl.train(cfg)
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(outcome.run_id, "loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) == 12
    assert losses[0] == pytest.approx(0.6931, abs=0.01)  # policy == reference at the start: log 2
    assert losses[-1] < losses[0] - 0.2
    acc = MlflowClient().get_metric_history(outcome.run_id, "rewards/accuracies")
    assert max(m.step for m in acc) == 12 and sorted(acc, key=lambda m: m.step)[-1].value == 1.0


def test_resume_from_checkpoint_gives_the_same_weights(tmp_path, tiny_whisper, speech_dir):
    cfg = make_config(tmp_path, tiny_whisper, speech_dir)
    straight = final_weights(audiorl.train(cfg))
    run_dir = Path(cfg.train.output_dir)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-3", "checkpoint-6"]
    as_if_killed_after_step_3(cfg)
    outcome = audiorl.train(cfg)
    assert outcome.result.resumed_from.endswith("checkpoint-3")
    resumed = final_weights(outcome)
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_checkpoint_from_another_config_is_refused(tmp_path, tiny_whisper, speech_dir):
    cfg = make_config(tmp_path, tiny_whisper, speech_dir, train={"max_steps": 3})
    audiorl.train(cfg)
    other = make_config(tmp_path, tiny_whisper, speech_dir, train={"max_steps": 3, "learning_rate": 5e-4, "resume": "auto"})
    with pytest.raises(TrainingError, match="different config"):
        audiorl.train(other)


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, tiny_whisper, speech_dir):
    # adam_epsilon=1 makes the first AdamW step ~ lr * g / (|g| + 1), close to SGD: the weights then
    # carry the gradient itself rather than its sign (which float noise can flip where g ~ 0)
    common = {"max_steps": 1, "learning_rate": 1e-2, "adam_epsilon": 1.0, "save_steps": None}
    one = make_config(tmp_path / "a", tiny_whisper, speech_dir, train={"per_device_train_batch_size": 4, **common})
    two = make_config(
        tmp_path / "b", tiny_whisper, speech_dir,
        train={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, **common},
    )
    a, b = final_weights(audiorl.train(one)), final_weights(audiorl.train(two))
    start = load_file(str(Path(one.model.name_or_path) / "model.safetensors"))
    moved = [n for n in a if not torch.equal(a[n], start[n])]
    assert moved  # the step changed the weights
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7, msg=name)


def test_precomputed_reference_trains_like_a_frozen_copy(tmp_path, tiny_whisper, speech_dir, capsys):
    frozen = make_config(tmp_path / "f", tiny_whisper, speech_dir, train={"max_steps": 3, "save_steps": None})
    pre = make_config(tmp_path / "p", tiny_whisper, speech_dir, objective={"precompute_reference": True}, train={"max_steps": 3, "save_steps": None})
    a = final_weights(audiorl.train(frozen))
    out = audiorl.train(pre)
    b = final_weights(out)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    cache = list((out.output_dir / "cache").glob("reference-logps-*.pt"))
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns
    capsys.readouterr()
    audiorl.train(pre)  # same model and data: the cache is reused, not recomputed
    assert cache[0].stat().st_mtime_ns == stamp
    assert "reusing" in capsys.readouterr().err
    # other data -> another key
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join((speech_dir / "pairs.jsonl").read_text().splitlines(keepends=True)[:5]).replace('"clips/', f'"{speech_dir}/clips/'))
    pre.data.train = str(subset)
    audiorl.train(pre)
    assert len(list((out.output_dir / "cache").glob("reference-logps-*.pt"))) == 2


def test_mpo_with_eval_logs_to_mlflow(tmp_path, tiny_whisper, speech_dir):
    cfg = make_config(
        tmp_path, tiny_whisper, speech_dir,
        data={"eval": str(speech_dir / "transcripts.jsonl")},
        objective={"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "bco_running_mean": True},
        train={"max_steps": 4, "eval_steps": 2, "generation_max_new_tokens": 8, "save_steps": None, "per_device_eval_batch_size": 12},
        tracking={"enabled": True, "experiment_name": "unit", "tags": {"team": "asr"}},
    )
    outcome = audiorl.train(cfg)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["objective.loss_type"] == '["sigmoid", "bco_pair", "sft"]'
    assert run.data.params["train.max_steps"] == "4"
    assert run.data.tags["team"] == "asr"
    assert run.data.tags["audiorl.objective"] == "dpo:sigmoid+bco_pair+sft"
    assert {m.step for m in client.get_metric_history(outcome.run_id, "eval/wer")} == {0, 2, 4}
    for key in ("loss/sigmoid", "loss/bco_pair", "loss/sft", "bco/delta", "grad_norm", "learning_rate", "samples_per_second"):
        assert client.get_metric_history(outcome.run_id, key), key
    # the final model is logged with the run and registered as the experiment's challenger
    version = client.get_model_version_by_alias("unit", "challenger")
    assert version.run_id == outcome.run_id and version.tags["audiorl.data_fingerprint"] == run.data.tags["audiorl.data_fingerprint"]
    assert "eval/wer_before_after.png" in {a.path for a in client.list_artifacts(outcome.run_id, "eval")}
    evals = {a.path for a in client.list_artifacts(outcome.run_id, "eval")}
    assert "eval/step-000000.json" in evals
    # the exported model loads back through the family's loader and transcribes
    result = audiorl.evaluate(outcome.final_model_dir, speech_dir / "transcripts.jsonl", max_new_tokens=8)
    assert result.num_utterances == 12


def test_several_test_sets_are_scored_apart_and_together(tmp_path, tiny_whisper, speech_dir):
    lines = (speech_dir / "transcripts.jsonl").read_text().replace('"clips/', f'"{speech_dir}/clips/').splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:5]))
    (tmp_path / "b.jsonl").write_text("".join(lines[5:]))
    cfg = make_config(
        tmp_path, tiny_whisper, speech_dir,
        data={"eval": {"set-a": str(tmp_path / "a.jsonl"), "set-b": str(tmp_path / "b.jsonl")}},
        train={"max_steps": 2, "eval_steps": 2, "generation_max_new_tokens": 8, "save_steps": None},
        tracking={"enabled": True, "experiment_name": "sets", "log_model": False},
    )
    outcome = audiorl.train(cfg)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    final = outcome.result.eval_metrics
    assert {m.step for m in client.get_metric_history(outcome.run_id, "eval/set-b/wer")} == {0, 2}
    # eval/wer is the corpus WER over both sets: errors summed, divided by all reference words
    counts = {}
    for name in ("set-a", "set-b"):
        path = client.download_artifacts(outcome.run_id, f"eval/{name}/step-000002.json", str(tmp_path / "dl"))
        result = json.loads(Path(path).read_text())
        assert result["num_utterances"] == (5 if name == "set-a" else len(lines) - 5)
        assert result["wer"] == pytest.approx(final[f"eval/{name}/wer"])
        counts[name] = result
    errors = sum(r["substitutions"] + r["deletions"] + r["insertions"] for r in counts.values())
    words = sum(r["substitutions"] + r["deletions"] + r["hits"] for r in counts.values())
    assert final["eval/wer"] == pytest.approx(errors / words)
    assert "eval/wer_before_after.png" in {a.path for a in client.list_artifacts(outcome.run_id, "eval")}
    assert outcome.eval_before.keys() == final.keys()


def test_the_starting_weights_are_scored_once_per_test_set_between_runs(tmp_path, tiny_whisper, speech_dir):
    """train.eval_before_cache_dir: a run from the same weights reads the step-0 transcripts the
    first one wrote (and only those: later evaluations decode); a new test set, or other weights
    in the very same files, is decoded."""
    import os
    import shutil

    from safetensors.torch import save_file

    lines = (speech_dir / "transcripts.jsonl").read_text().replace('"clips/', f'"{speech_dir}/clips/').splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:5]))
    (tmp_path / "b.jsonl").write_text("".join(lines[5:]))
    base = tmp_path / "base"  # a copy of its own: its weights change below
    shutil.copytree(tiny_whisper, base)
    cache = tmp_path / "before"

    def run(name, sets):
        cfg = make_config(tmp_path, base, speech_dir, data={"eval": sets},
                          train={"output_dir": str(tmp_path / name), "max_steps": 1, "generation_max_new_tokens": 8, "save_steps": None,
                                 "eval_before_cache_dir": str(cache)})
        outcome = audiorl.train(cfg)
        return outcome.eval_before, outcome.result.eval_metrics

    first, _ = run("first", {"set-a": str(tmp_path / "a.jsonl")})
    (written,) = cache.glob("eval-before-*.json")
    assert first["eval/wer"] > 0  # random weights: something to tell a cached read from a decode
    # the cache holds transcripts; put the references there, and a run that reads it scores 0
    references = [json.loads(line)["text"] for line in lines[:5]]
    assert len(json.loads(written.read_text())["hypotheses"]) == len(references)
    written.write_text(json.dumps({"test_set": "set-a", "hypotheses": references}))
    second, second_after = run("second", {"set-a": str(tmp_path / "a.jsonl"), "set-b": str(tmp_path / "b.jsonl")})
    assert second["eval/set-a/wer"] == 0
    assert second_after["eval/set-a/wer"] > 0  # the trained weights are decoded, never read
    assert second["eval/set-b/wer"] > 0 and len(list(cache.glob("eval-before-*.json"))) == 2
    # a cache file that does not hold one transcript per clip is decoded again, not trusted
    for number, stale in enumerate([json.dumps({"hypotheses": references[:2]}), json.dumps({"hypotheses": [None] * 5}), "not json"]):
        written.write_text(stale)
        assert run(f"stale-{number}", {"set-a": str(tmp_path / "a.jsonl")})[0]["eval/wer"] == pytest.approx(first["eval/wer"])
    # one weight changed in the same file, its size and modification time kept: the file list
    # looks the same, the weights do not, so set-a is decoded again under a key of its own
    weights_file = base / "model.safetensors"
    stat = weights_file.stat()
    weights = load_file(str(weights_file))
    name = next(iter(sorted(weights)))
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_file.stat().st_size == stat.st_size
    third, _ = run("third", {"set-a": str(tmp_path / "a.jsonl")})
    assert third["eval/wer"] > 0 and len(list(cache.glob("eval-before-*.json"))) == 3


def test_a_test_set_name_must_suit_a_metric_key(tmp_path):
    from audiorl.config import validate_config
    from audiorl.errors import ConfigError

    with pytest.raises(ConfigError, match="run.yaml: invalid config: data.eval: .*test set name 'held out'"):
        validate_config({"model": {"name_or_path": "m"}, "data": {"eval": {"held out": "x.jsonl"}}}, "run.yaml")
    one = validate_config({"model": {"name_or_path": "m"}, "data": {"eval": "data/test-clean.jsonl"}})
    assert one.data.eval_sets() == {"test-clean": "data/test-clean.jsonl"}


def test_bad_record_skipped_and_counted(tmp_path, tiny_whisper, speech_dir, capfd):
    manifest = tmp_path / "pairs.jsonl"
    lines = (speech_dir / "pairs.jsonl").read_text().replace('"clips/', f'"{speech_dir}/clips/')
    # a signed URL's credentials in a bad record stay out of the error, the skip file and the log
    signed = "missing.wav?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE&X-Amz-Signature=5ecre7d1ce"
    manifest.write_text(lines + json.dumps({"audio": signed, "chosen": "a", "rejected": "b"}) + "\n")
    cfg = make_config(tmp_path, tiny_whisper, speech_dir, data={"train": str(manifest)}, train={"max_steps": 1, "save_steps": None})
    from audiorl.errors import DataError

    with pytest.raises(DataError, match=r"pairs\.jsonl:13: audio file not found"):
        audiorl.train(cfg)
    cfg.data.on_bad_record = "skip"
    outcome = audiorl.train(cfg)
    assert [r.source for r in outcome.skipped] == [f"{manifest}:13"]
    skipped = (outcome.output_dir / "skipped_records.jsonl").read_text()
    assert "missing.wav?X-Amz-Credential=***" in skipped
    assert "5ecre7d1ce" not in skipped + capfd.readouterr().err and "IOSFODNN7" not in skipped


def test_several_training_sources_are_read_in_turn_each_checked(tmp_path, tiny_whisper, speech_dir):
    # the replay knob: a second manifest joins the first; its bad record is reported by its own name
    lines = (speech_dir / "pairs.jsonl").read_text().replace('"clips/', f'"{speech_dir}/clips/').splitlines()
    hard, replay, joined = tmp_path / "hard.jsonl", tmp_path / "replay.jsonl", tmp_path / "joined.jsonl"
    hard.write_text("\n".join(lines[:8]) + "\n")
    replay.write_text("\n".join(lines[8:]) + '\n{"audio": "missing.wav", "chosen": "a", "rejected": "b"}\n')
    joined.write_text("\n".join(lines) + "\n")
    from mlflow.tracking import MlflowClient

    from audiorl.errors import DataError

    cfg = make_config(tmp_path, tiny_whisper, speech_dir, data={"train": [str(hard), str(replay)]},
                      train={"max_steps": 1, "save_steps": None}, tracking={"enabled": True, "log_model": False})
    with pytest.raises(DataError, match=rf"{replay}:{len(lines) - 8 + 1}: audio file not found"):
        audiorl.train(cfg)
    cfg.data.on_bad_record = "skip"
    both = audiorl.train(cfg)
    assert [r.source for r in both.skipped] == [f"{replay}:{len(lines) - 8 + 1}"]
    cfg.data.train, cfg.train.output_dir = str(joined), str(tmp_path / "joined-run")
    one = audiorl.train(cfg)
    client = MlflowClient()
    tag = "audiorl.data_fingerprint"
    # the two sources hold, in order, exactly the records of the one manifest that joins them
    assert client.get_run(both.run_id).data.tags[tag] == client.get_run(one.run_id).data.tags[tag]
    with pytest.raises(Exception, match="a manifest is listed twice"):
        make_config(tmp_path, tiny_whisper, speech_dir, data={"train": [str(hard), str(hard)]})
    with pytest.raises(Exception, match="an empty list"):
        make_config(tmp_path, tiny_whisper, speech_dir, data={"train": []})


def test_nan_steps_are_skipped_counted_and_bounded(tmp_path, tiny_whisper, speech_dir, monkeypatch):
    (tmp_path / "flaky_loss.py").write_text(
        "import torch.nn.functional as F\ncalls = 0\n"
        "def sometimes_nan(pairs):\n"
        "    global calls\n    calls += 1\n"
        "    loss = -F.logsigmoid(pairs.beta * pairs.delta)\n"
        "    return loss * float('nan') if calls in (2, 4) else loss\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import sys

    sys.modules.pop("flaky_loss", None)
    cfg = make_config(tmp_path, tiny_whisper, speech_dir, objective={"loss_type": ["flaky_loss:sometimes_nan"]},
                      train={"max_steps": 5, "save_steps": None, "max_bad_steps": 2}, tracking={"enabled": True})
    outcome = audiorl.train(cfg)
    assert outcome.result.last_metrics["bad_steps"] == 2
    weights = final_weights(outcome)
    assert all(torch.isfinite(w).all() for w in weights.values())  # the NaN steps changed nothing
    sys.modules.pop("flaky_loss", None)
    cfg.train.max_bad_steps = 1
    cfg.train.output_dir = str(tmp_path / "again")
    with pytest.raises(TrainingError, match=r"2 steps had a NaN/inf loss or gradient \(train.max_bad_steps=1\)"):
        audiorl.train(cfg)


def test_ld_dpo_and_wpo_weigh_the_same_with_a_precomputed_reference(tmp_path, tiny_whisper, speech_dir):
    """LD-DPO weighs the reference's tail tokens too: scored once before training (the weighted
    sums cached under their own key) or by a frozen copy at every step, the run ends the same."""
    options = {"ld_alpha": 0.5, "use_weighting": True}
    frozen = make_config(tmp_path / "f", tiny_whisper, speech_dir, objective=options, train={"max_steps": 3, "save_steps": None})
    pre = make_config(tmp_path / "p", tiny_whisper, speech_dir, objective={**options, "precompute_reference": True},
                      train={"max_steps": 3, "save_steps": None})
    a, out = final_weights(audiorl.train(frozen)), audiorl.train(pre)
    b = final_weights(out)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [p.name for p in (out.output_dir / "cache").glob("reference-logps-*-ld0.5.pt")]
    plain = final_weights(audiorl.train(make_config(tmp_path / "d", tiny_whisper, speech_dir, train={"max_steps": 3, "save_steps": None})))
    assert any(not torch.allclose(a[name], plain[name]) for name in a)  # the options change what is learned


@pytest.mark.parametrize("deterministic", [True, False])
def test_train_deterministic_makes_the_gradient_the_same_every_time(tmp_path, tiny_whisper, speech_dir, deterministic, request):
    # the gradient of the decoder's position lookup, 48 rows of 32 tokens on two threads: torch
    # sums it in an order that varies from call to call unless train.deterministic (the default)
    # asks for its deterministic kernel; GRPO's sampling turns such a last-bit difference into
    # different rollouts, and so into a different run
    from audiorl.audio import AudioLimits
    from audiorl.data.collate import RecordDataset, TranscriptCollator
    from audiorl.data.records import read_records
    from audiorl.models.registry import load_adapter
    from audiorl.run import set_up_runtime
    from audiorl.runtime import set_deterministic

    request.addfinalizer(lambda: set_deterministic(True))  # the process-wide switch back to the default for later tests
    cfg = make_config(tmp_path, tiny_whisper, speech_dir, train={"num_threads": 2, "deterministic": deterministic})
    set_up_runtime(cfg)
    assert torch.are_deterministic_algorithms_enabled() is deterministic
    if not deterministic:
        return  # the other way is torch's to decide, and it usually differs; the run only has to ask
    adapter = load_adapter(cfg.model)
    dataset = RecordDataset(read_records(speech_dir / "transcripts.jsonl", "transcript")[:3], AudioLimits(max_seconds=5))
    batch = TranscriptCollator(adapter)([dataset[i] for i in range(3)])
    with torch.no_grad():
        context = adapter.encode(batch["features"])
    targets, index = [list(range(5, 37))] * 48, torch.arange(3).repeat_interleave(16)
    positions = adapter.model.model.decoder.embed_positions.weight
    seen = set()
    for _ in range(10):
        positions.grad = None
        adapter.sequence_logps(context, targets, index).token_logps.sum().backward()
        seen.add(positions.grad.numpy().tobytes())
    assert len(seen) == 1
