"""Multi-process training for real: torchrun with 2 ranks and the gloo backend on CPU."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path, tiny_whisper, speech_dir, name, **train):
    return write_config(
        tmp_path / f"{name}.yaml",
        {
            "model": {"name_or_path": str(tiny_whisper)},
            "data": {"train": str(speech_dir / "pairs.jsonl"), "max_audio_seconds": 5},
            "objective": {"loss_type": ["sigmoid", "sft"], "beta": 0.5},
            "train": {"output_dir": str(tmp_path / name), "max_steps": 4, "learning_rate": 1e-3, "logging_steps": 1,
                      "save_steps": None, "resume": "never", "num_threads": 1, **train},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": name},
        },
    )


def _launch(config, nproc, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "audiorl_cli.main", "train", str(config)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_free_port()}",
               "-m", "audiorl_cli.main", "train", str(config)]
    for item in overrides:
        cmd += ["--set", item]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _kill_tree(pid: int) -> None:
    import psutil

    parent = psutil.Process(pid)
    for process in parent.children(recursive=True) + [parent]:
        process.send_signal(signal.SIGKILL)


def _run(config, nproc, *overrides, timeout=600):
    proc = _launch(config, nproc, *overrides)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _losses(tmp_path, experiment, key="loss"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def _one_rank(tmp_path_factory, tiny_whisper, speech_dir, name, *overrides, key="loss"):
    """A one-process run of batch 6 that several multi-rank tests compare with: (logged `key` per
    step, final weights)."""
    folder = tmp_path_factory.mktemp(name)
    rc, _, err = _run(_config(folder, tiny_whisper, speech_dir, name, per_device_train_batch_size=6), 1, *overrides)
    assert rc == 0, err[-2000:]
    return _losses(folder, name, key), load_file(str(folder / name / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def one_rank_sigmoid(tmp_path_factory, tiny_whisper, speech_dir):
    return _one_rank(tmp_path_factory, tiny_whisper, speech_dir, "single", "objective.loss_type=[sigmoid]")


GRPO = ["objective.name=grpo", "objective.loss_type=grpo", "objective.num_generations=4", "objective.max_completion_length=6"]


@pytest.fixture(scope="module")
def one_rank_grpo(tmp_path_factory, tiny_whisper, speech_dir):
    return _one_rank(tmp_path_factory, tiny_whisper, speech_dir, "grpo-single", *GRPO, "data.train=" + str(speech_dir / "transcripts.jsonl"),
                     key="reward")


@pytest.mark.parametrize("streaming", [False, True], ids=["up-front", "streaming"])
def test_two_ranks_of_batch_b_follow_one_rank_of_batch_2b(tmp_path, tiny_whisper, speech_dir, one_rank_sigmoid, streaming):
    # sigmoid DPO is a mean over pairs, so averaging the ranks' gradients is exactly the large
    # batch's gradient (a token-averaged term such as sft is averaged per rank instead); with
    # streaming each rank checks only the records of its own slices, and trains the same
    two = _config(tmp_path, tiny_whisper, speech_dir, "ddp", per_device_train_batch_size=3)
    rc, _, err = _run(two, 2, "objective.loss_type=[sigmoid]", f"data.streaming={str(streaming).lower()}")
    assert rc == 0, err[-2000:]
    (single, w1), ddp = one_rank_sigmoid, _losses(tmp_path, "ddp")
    assert len(single) == len(ddp) == 4
    # the logged loss is the mean over ranks; the curves agree to float noise
    for a, b in zip(single, ddp):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
    w2 = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp2_two_ranks_follow_one_rank_and_resume_on_one(tmp_path, tiny_whisper, speech_dir, one_rank_sigmoid):
    """FSDP2 (layers sharded over 2 ranks, streaming records) follows a single process; its
    distributed checkpoint (written as 2 shards) resumes in a single process and ends on the same
    weights."""
    two = _config(tmp_path, tiny_whisper, speech_dir, "fsdp", per_device_train_batch_size=3, max_steps=4, save_steps=2,
                  save_total_limit=None)
    rc, _, err = _run(two, 2, "objective.loss_type=[sigmoid]", "train.distributed.strategy=fsdp", "data.streaming=true")
    assert rc == 0, err[-3000:]
    (single, w1), sharded = one_rank_sigmoid, _losses(tmp_path, "fsdp")
    for a, b in zip(single, sharded, strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
    w2 = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)
    # resume the 2-rank run's step-2 checkpoint in one process with the same global batch
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "checkpoint-4")
    shutil.rmtree(tmp_path / "fsdp" / "final")
    rc, _, err = _run(two, 1, "objective.loss_type=[sigmoid]", "train.per_device_train_batch_size=6", "train.resume=auto",
                      "data.streaming=true")
    assert rc == 0, err[-3000:]
    w3 = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))
    for name in w1:
        torch.testing.assert_close(w3[name], w2[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_grpo_two_ranks_follow_one_rank(tmp_path, tiny_whisper, speech_dir, strategy, one_rank_grpo):
    """GRPO too: each clip's samples come from its own seeded generator, so a clip gets the same
    completions on either rank layout; `grpo` aggregation (a mean over sequences) and group
    advantages make the averaged gradients equal. Under FSDP the rollouts decode in lockstep."""
    two = _config(tmp_path, tiny_whisper, speech_dir, "grpo-ddp", per_device_train_batch_size=3)
    rc, _, err = _run(two, 2, *GRPO, "data.train=" + str(speech_dir / "transcripts.jsonl"), f"train.distributed.strategy={strategy}")
    assert rc == 0, err[-2000:]
    # with one iteration per rollout the surrogate's value is ~0 by construction; the rewards of
    # the sampled completions and the weights the gradients produce are what must agree
    (single, w1), ddp = one_rank_grpo, _losses(tmp_path, "grpo-ddp", "reward")
    assert len(single) == len(ddp) == 4
    for a, b in zip(single, ddp):
        assert b == pytest.approx(a, abs=1e-6)
    w2 = load_file(str(tmp_path / "grpo-ddp" / "final" / "model.safetensors"))
    moved = load_file(str(tiny_whisper / "model.safetensors"))
    assert any(not torch.equal(w1[n], moved[n]) for n in w1)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


def _shards_with_a_bad_sample(root, speech_dir):
    """The 12 pairs as 3 shards of 4, and in shard 1 a 13th sample: silence with a transcript,
    which only decoding finds bad; the pattern naming the shards."""
    import io
    import tarfile

    import numpy as np
    import soundfile as sf

    from tests.test_webdataset import _add, write_shards

    write_shards(root, speech_dir)
    silent = io.BytesIO()
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000, format="WAV")
    with tarfile.open(root / "train-000001.tar", "a") as tar:
        _add(tar, "silent.wav", silent.getvalue())
        _add(tar, "silent.json", json.dumps({"chosen": "lights on", "rejected": "lights off"}).encode())
    return str(root / "train-{000000..000002}.tar")


def test_sigkill_then_resume_gives_the_uninterrupted_weights_on_shards_dealt_to_ranks(tmp_path, tiny_whisper, speech_dir):
    """Streaming WebDataset shards under 2 ranks: rank 0 reads shards 0 and 2 only (8 samples),
    rank 1 shard 1 with its bad sample; rank 0 hears of that sample from rank 1, writes and logs it
    once. A run killed (SIGKILL, every process) after its step-8 checkpoint and resumed ends on
    the uninterrupted run's weights, and does not count the bad sample twice."""
    pattern = _shards_with_a_bad_sample(tmp_path / "shards", speech_dir)

    def config(name, resume):
        return write_config(tmp_path / f"{name}.yaml", {
            "model": {"name_or_path": str(tiny_whisper)},
            "data": {"train": pattern, "streaming": True, "on_bad_record": "skip", "max_bad_fraction": 0.2, "max_audio_seconds": 5},
            "objective": {"loss_type": ["sigmoid", "sft"], "beta": 0.5},
            "train": {"output_dir": str(tmp_path / name), "per_device_train_batch_size": 2, "max_steps": 16, "save_steps": 4,
                      "learning_rate": 1e-3, "logging_steps": 1, "resume": resume, "num_threads": 1},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": name},
        })

    rc, out, err = _run(config("straight", "never"), 2)
    assert rc == 0, err[-3000:]
    said = " ".join((out + err).split())  # the console wraps long lines
    assert "3 WebDataset shards dealt to 2 ranks, 2 to rank 0" in said and "8 records read on this rank, 13 on all 2" in said
    (row,) = [json.loads(line) for line in (tmp_path / "straight" / "skipped_records.jsonl").read_text().splitlines()]
    assert row["source"].endswith("train-000001.tar:silent") and row["rank"] == 1 and "digital silence" in row["reason"]
    assert _losses(tmp_path, "straight", "data/bad_records") == [1.0]

    killed = config("killed", "auto")
    proc = _launch(killed, 2)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while not (checkpoints / "checkpoint-8").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its eighth step"
        time.sleep(0.02)
    _kill_tree(proc.pid)  # the launcher and both workers (torchrun gives them sessions of their own)
    proc.communicate(timeout=60)
    assert not (tmp_path / "killed" / "final").exists()
    rc, _, err = _run(killed, 2)
    assert rc == 0, err[-2000:]
    state = json.loads((checkpoints / "checkpoint-16" / "trainer_state.json").read_text())
    assert state["global_step"] == 16 and state["world_size"] == 2
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    assert len((tmp_path / "killed" / "skipped_records.jsonl").read_text().splitlines()) == 1


def _transcript_shards(root, speech_dir, per_shard=2):
    """The speech corpus's transcripts as shards of `per_shard` clips (KEY.wav, KEY.txt); their paths."""
    import io
    import tarfile

    rows = [json.loads(line) for line in (speech_dir / "transcripts.jsonl").read_text().splitlines()]
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(rows), per_shard):
        paths.append(root / f"train-{start // per_shard:06d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for i, row in enumerate(rows[start : start + per_shard], start=start):
                for name, data in ((f"utt{i:04d}.wav", (speech_dir / row["audio"]).read_bytes()), (f"utt{i:04d}.txt", row["text"].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return paths


def test_a_mixture_of_shard_sources_deals_each_source_to_every_rank_and_resumes_the_same(tmp_path, tiny_whisper, speech_dir):
    """Two WebDataset sources (4 shards of hard cases, 2 of replay with weight 3), streamed by 2
    ranks: each rank gets shards of both sources and draws its own mixture from them; the small
    replay source is drawn more than it holds; a run resumed from its step-3 checkpoint ends on the
    uninterrupted run's weights."""
    _transcript_shards(tmp_path / "shards", speech_dir)
    hard, replay = (str(tmp_path / "shards" / f"train-{{{a:06d}..{b:06d}}}.tar") for a, b in ((0, 3), (4, 5)))
    config = write_config(tmp_path / "mix.yaml", {
        "model": {"name_or_path": str(tiny_whisper)},
        "data": {"train": [{"path": hard, "weight": 1}, {"path": replay, "weight": 3}], "streaming": True, "max_audio_seconds": 5},
        "objective": {"name": "sft"},
        "train": {"output_dir": str(tmp_path / "mix"), "per_device_train_batch_size": 2, "max_steps": 6, "save_steps": 3,
                  "learning_rate": 1e-3, "logging_steps": 1, "resume": "auto", "num_threads": 1, "eval_before_training": False},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "mix"},
    })
    rc, out, err = _run(config, 2)
    assert rc == 0, err[-3000:]
    said = " ".join((out + err).split())
    assert "each source's WebDataset shards dealt to 2 ranks, 2 + 1 to rank 0" in said
    assert "6 records read on this rank, 12 on all 2" in said
    from mlflow.tracking import MlflowClient

    from audiorl.data.mixture import source_names

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mix").experiment_id])
    metrics = run.data.metrics
    hard_name, replay_name = source_names([hard, replay])
    assert (metrics[f"data/source/{hard_name}/records"], metrics[f"data/source/{replay_name}/records"]) == (8, 4)
    hard_draws, replay_draws = (metrics[f"data/source/{name}/draws_per_epoch"] for name in (hard_name, replay_name))
    assert hard_draws + replay_draws == 12 and replay_draws > 4  # the replay source, weighted 3, repeats
    straight = load_file(str(tmp_path / "mix" / "final" / "model.safetensors"))

    shutil.rmtree(tmp_path / "mix" / "checkpoints" / "checkpoint-6")
    shutil.rmtree(tmp_path / "mix" / "final")
    rc, out, err = _run(config, 2)
    assert rc == 0, err[-3000:]
    assert "resumed from checkpoint-3: step 3 of 6" in err
    assert len(client.search_runs([client.get_experiment_by_name("mix").experiment_id])) == 1  # the same MLflow run, continued
    resumed = load_file(str(tmp_path / "mix" / "final" / "model.safetensors"))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_batches_by_length_on_shards_dealt_to_ranks_plan_each_rank_over_its_own_clips(tmp_path, tiny_models, speech_dir):
    """An audio LLM (its cost grows with the clip) batched by length on 6 shards streamed by 2
    ranks: each rank cuts its batches from its own 3 shards' clips, and one epoch is as many steps
    as the rank with more batches has."""
    from audiorl.data.batching import duration_plan
    from audiorl.data.records import read_records

    shards = _transcript_shards(tmp_path / "shards", speech_dir)
    durations = {rank: [r.duration() for shard in shards[rank::2] for r in read_records(str(shard), "transcript")] for rank in (0, 1)}
    budget = 2.5 * max(max(d) for d in durations.values())
    steps = max(len(duration_plan(durations[rank], budget)) for rank in (0, 1))
    config = write_config(tmp_path / "len.yaml", {
        "model": {"family": "qwen3_asr", "name_or_path": str(tiny_models["qwen3_asr"])},
        "data": {"train": str(tmp_path / "shards" / "train-{000000..000005}.tar"), "streaming": True, "max_audio_seconds": 5,
                 "batch_seconds": budget},
        "objective": {"name": "sft"},
        "train": {"output_dir": str(tmp_path / "len"), "num_train_epochs": 1, "max_steps": None, "learning_rate": 1e-3,
                  "logging_steps": 1, "save_steps": None, "resume": "never", "num_threads": 1, "eval_before_training": False},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "len"},
    })
    rc, out, err = _run(config, 2)
    assert rc == 0, err[-3000:]
    said = " ".join((out + err).split())
    assert "6 WebDataset shards dealt to 2 ranks, 3 to rank 0" in said
    assert f"batches by length (data.batch_seconds={budget:g}) of this rank's records: {len(duration_plan(durations[0], budget))} " \
        "batches per epoch" in said
    assert len(_losses(tmp_path, "len")) == steps


def test_sigterm_writes_a_checkpoint_and_resume_matches(tmp_path, tiny_whisper, speech_dir):
    """SIGTERM mid-run (with gradient accumulation, so possibly mid-step): a checkpoint, exit 143,
    and a resumed run ends on the weights of a run that was never interrupted."""
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=20, save_steps=1000)
    whole = _config(tmp_path, tiny_whisper, speech_dir, "whole", **common)
    rc, _, err = _run(whole, 1)
    assert rc == 0, err[-2000:]
    cfg = _config(tmp_path, tiny_whisper, speech_dir, "preempted", resume="auto", **common)
    proc = _launch(cfg, 1)
    deadline = time.time() + 120
    while not _has_steps(tmp_path, "preempted"):  # training is under way
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err
    (checkpoint,) = list((tmp_path / "preempted" / "checkpoints").glob("checkpoint-*"))
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert 0 < step < 20
    rc, _, err = _run(cfg, 1)
    assert rc == 0, err[-2000:]
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "preempted" / "final" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def _has_steps(tmp_path, experiment) -> bool:
    try:
        return bool(_losses(tmp_path, experiment))
    except Exception:
        return False


def test_a_failing_rank_fails_the_job_promptly(tmp_path, tiny_whisper, speech_dir, monkeypatch):
    """Rank 1 raises in its third step (a user loss that fails there); rank 0 is then waiting in
    the gradient all-reduce. The job must exit non-zero within seconds, not hang."""
    (tmp_path / "faulty.py").write_text(
        "import os\nimport torch.nn.functional as F\ncalls = 0\n"
        "def boom(pairs):\n"
        "    global calls\n    calls += 1\n"
        "    if os.environ.get('RANK') == '1' and calls == 3:\n        raise RuntimeError('rank 1 fails on purpose')\n"
        "    return -F.logsigmoid(pairs.beta * pairs.delta)\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cfg = _config(tmp_path, tiny_whisper, speech_dir, "broken", per_device_train_batch_size=2, max_steps=6)
    start = time.time()
    rc, _, err = _run(cfg, 2, "objective.loss_type=[faulty:boom]", timeout=180)
    assert rc != 0
    assert "rank 1 fails on purpose" in err
    assert time.time() - start < 90


def test_the_strategy_says_where_test_sets_are_scored():
    from audiorl.distributed import Dist, strategy_for

    single = strategy_for("fsdp", Dist())  # one process: no sharding whatever the setting
    assert (single.name, single.evaluates_in_loop, single.evaluates_export, single.lockstep, single.caches_encoder) == \
        ("single", True, False, False, True)
    main, other = Dist(rank=0, world_size=2), Dist(rank=1, world_size=2, local_rank=1)
    assert strategy_for("auto", main).name == "ddp"
    assert strategy_for("ddp", main).evaluates_in_loop and not strategy_for("ddp", other).evaluates_in_loop
    fsdp = strategy_for("fsdp", main)
    # a sharded model cannot generate on one rank: the base before sharding, then the exported model
    assert (fsdp.evaluates_in_loop, fsdp.evaluates_export, fsdp.lockstep, fsdp.caches_encoder) == (False, True, True, False)
    assert not strategy_for("fsdp", other).evaluates_export
