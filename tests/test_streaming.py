"""Streaming (`data.streaming: true`): training starts without decoding every clip first; each
record is checked when training reads it, a bad one's place goes to the next good record, and the
bad ones are counted by reason, written and logged as they are met, up to data.max_bad_fraction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import audiorl
from audiorl.data.streaming import reason_kind
from audiorl.errors import DataError
from tests.test_training import as_if_killed_after_step_3, final_weights, make_config

RATE = 16000


def _manifest_with_bad_records(tmp_path: Path, speech_dir: Path) -> tuple[Path, list[str]]:
    """The 12 good pairs with three bad records among them: a missing clip, a truncated WAV and
    a clip past the tiny model's 5 s window; and the line of each bad one."""
    rows = [json.loads(line) for line in (speech_dir / "pairs.jsonl").read_text().splitlines()]
    rows = [{**r, "audio": str(speech_dir / r["audio"])} for r in rows]
    tone = (0.1 * np.sin(np.arange(7 * RATE) / 3)).astype(np.float32)
    sf.write(tmp_path / "long.wav", tone, RATE)
    sf.write(tmp_path / "full.wav", tone[:RATE], RATE)
    whole = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) // 2])
    bad = [("missing.wav", "audio file not found"), (str(tmp_path / "cut.wav"), "truncated"), (str(tmp_path / "long.wav"), "over the 5 s limit")]
    for at, (audio, _) in zip((2, 7, 11), bad):
        rows.insert(at, {"audio": audio, "chosen": "turn on the lights", "rejected": "turn off the lights"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [f"{path}:{at + 1}" for at in (2, 7, 11)]


def _streamed(output_dir: Path) -> list[dict]:
    return [row for row in map(json.loads, (output_dir / "skipped_records.jsonl").read_text().splitlines()) if row.get("streamed")]


def test_bad_records_are_found_while_training_counted_by_kind_and_logged(tmp_path, tiny_whisper, speech_dir):
    manifest, bad_lines = _manifest_with_bad_records(tmp_path, speech_dir)
    # the up-front pass names all three before any step
    upfront = make_config(tmp_path, tiny_whisper, speech_dir, data={"train": str(manifest)}, train={"save_steps": None})
    with pytest.raises(DataError, match=r"^3 bad record\(s\)"):
        audiorl.train(upfront)
    # streaming with on_bad_record=error: the first one met stops the run, from inside training
    cfg = make_config(tmp_path, tiny_whisper, speech_dir, data={"train": str(manifest), "streaming": True},
                      train={"max_steps": 4, "save_steps": None}, tracking={"enabled": True})
    with pytest.raises(DataError, match=r"1 of 15 training records are bad \(6\.7%\), none allowed \(data.on_bad_record=error\)"):
        audiorl.train(cfg)
    # skip: 4 steps of 4 see every record; each bad one is counted once, by kind, and written with its line
    cfg.data.on_bad_record, cfg.data.max_bad_fraction = "skip", 0.25
    outcome = audiorl.train(cfg)
    reasons = {row["source"]: row["reason"] for row in _streamed(outcome.output_dir)}
    assert sorted(reasons) == sorted(bad_lines)
    for line, why in zip(bad_lines, ["audio file not found", "truncated: its WAV header promises", "over the 5 s limit"]):
        assert reasons[line].startswith(f"{line}: ") and why in reasons[line]
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    metrics = client.get_run(outcome.run_id).data.metrics
    assert metrics["data/bad_records"] == 3
    assert {k: v for k, v in metrics.items() if k.startswith("data/bad_records/")} == {
        "data/bad_records/audio_file_not_found": 1, "data/bad_records/truncated": 1,
        "data/bad_records/clip_is_n_s_long_over_the_n_s_limit": 1}
    assert "data/skipped_records.jsonl" in {a.path for a in client.list_artifacts(outcome.run_id, "data")}


def test_the_run_stops_once_bad_records_pass_the_allowed_share(tmp_path, tiny_whisper, speech_dir):
    manifest, _ = _manifest_with_bad_records(tmp_path, speech_dir)
    cfg = make_config(tmp_path, tiny_whisper, speech_dir, data={"train": str(manifest), "streaming": True, "on_bad_record": "skip",
                                                                 "max_bad_fraction": 0.1}, train={"max_steps": 4, "save_steps": None})
    with pytest.raises(DataError, match=r"2 of 15 training records are bad \(13\.3%\), over data.max_bad_fraction=0.1; the first: .*"
                                        r"skipped_records.jsonl"):
        audiorl.train(cfg)


def test_streaming_clean_data_trains_the_weights_the_up_front_pass_trains(tmp_path, tiny_whisper, speech_dir):
    upfront = final_weights(audiorl.train(make_config(tmp_path / "a", tiny_whisper, speech_dir, train={"save_steps": None})))
    streamed = final_weights(audiorl.train(make_config(tmp_path / "b", tiny_whisper, speech_dir, data={"streaming": True},
                                                       train={"save_steps": None})))
    for name in upfront:
        torch.testing.assert_close(streamed[name], upfront[name], rtol=0, atol=0, msg=name)


def test_a_resumed_streaming_run_continues_where_its_data_was(tmp_path, tiny_whisper, speech_dir):
    """Killed after step 3 of 6, the run resumes at the data position of step 3 (not the start),
    ends on the uninterrupted weights, and counts each bad record once over both attempts."""
    manifest, bad_lines = _manifest_with_bad_records(tmp_path, speech_dir)
    cfg = make_config(tmp_path, tiny_whisper, speech_dir, data={"train": str(manifest), "streaming": True, "on_bad_record": "skip",
                                                                 "max_bad_fraction": 0.25})
    straight = final_weights(audiorl.train(cfg))
    as_if_killed_after_step_3(cfg)
    outcome = audiorl.train(cfg)
    assert outcome.result.resumed_from.endswith("checkpoint-3")
    resumed = final_weights(outcome)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    assert sorted(row["source"] for row in _streamed(Path(cfg.train.output_dir))) == sorted(bad_lines)


@pytest.mark.parametrize("reason, kind", [
    ("m.jsonl:3: audio file not found (/data/a.wav)", "audio_file_not_found"),
    ("s3://b/m.jsonl:9: clip is 31.2 s long, over the 30 s limit (data.max_audio_seconds); split it", "clip_is_n_s_long_over_the_n_s_limit"),
    ("m.jsonl:4: cannot decode audio (Error opening 'x': Format not recognised.); supported: WAV", "cannot_decode_audio"),
])
def test_bad_records_are_grouped_by_what_is_wrong_not_where(reason, kind):
    assert reason_kind(reason) == kind


def test_shards_are_dealt_to_ranks_and_each_rank_batches_its_own_samples():
    from audiorl.data.batching import duration_plan
    from audiorl.data.mixture import Source, draws_per_source
    from audiorl.data.streaming import own_shards, rank_batches

    shards = [f"train-{i:06d}.tar" for i in range(5)]
    dealt = [own_shards(shards, rank, 2) for rank in range(2)]
    assert sorted(dealt[0] + dealt[1]) == shards and not set(dealt[0]) & set(dealt[1])
    with pytest.raises(DataError, match=r"replay.tar: 2 WebDataset shard\(s\) for 4 ranks: .* give at least 4"):
        own_shards(shards[:2], 0, 4, label="replay.tar")
    # rank 0 holds 8 records, rank 1 five: both take ceil(8 / 3) = 3 batches an epoch, full ones
    mine_sources, their_sources = [Source("a", 0, 8)], [Source("a", 0, 5)]
    plans = {0: rank_batches(mine_sources, 3, seed=7, rank=0, epoch=0), 1: rank_batches(their_sources, 3, seed=7, rank=1, epoch=0, length=3)}
    assert [len(b) for b in plans[0]] == [len(b) for b in plans[1]] == [3, 3, 3]
    mine = [i for batch in plans[0] for i in batch]
    assert sorted(set(mine)) == list(range(8)) and len(mine) == 9  # every record once, the first again to fill
    theirs = [i for batch in plans[1] for i in batch]
    assert sorted(set(theirs)) == list(range(5)) and theirs[5:] == theirs[:4]  # the short rank starts its order again
    # the same plan again (resume), another one the next epoch and on the other rank
    assert rank_batches(mine_sources, 3, seed=7, rank=0, epoch=0) == plans[0]
    assert rank_batches(mine_sources, 3, seed=7, rank=0, epoch=1) != plans[0]
    assert rank_batches(mine_sources, 3, seed=7, rank=1, epoch=0) != plans[0]
    # a weighted mixture of the rank's own two sources: drawn by weight, the small one repeating
    mixed = [Source("hard", 0, 40, weight=1.0), Source("replay", 40, 4, weight=3.0)]
    draws = [i for batch in rank_batches(mixed, 4, seed=7, rank=1, epoch=0) for i in batch]
    assert len(draws) == 44 and 25 < draws_per_source(mixed, draws)["replay"] < 40 and set(draws) <= set(range(44))
    # batches by length over the rank's own clips: the plan's batches, repeated to the length asked
    durations = [1.0, 1.2, 3.0, 3.1, 0.9, 2.0, 2.2]
    plan = duration_plan(durations, 4.5)
    by_length = rank_batches([], 4, seed=7, rank=0, epoch=0, plan=plan)
    assert sorted(tuple(b) for b in by_length) == sorted(tuple(group[0]) for group in plan)
    longer = rank_batches([], 4, seed=7, rank=0, epoch=0, plan=plan, length=len(plan) + 2)
    assert longer == by_length + by_length[:2]
