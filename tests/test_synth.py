"""`audiorl data synth`: a spoken corpus from espeak-ng, split so that evaluation holds out whole
sentences and whole accents."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audiorl.audio import AudioLimits
from audiorl.data.records import read_records, validate_records
from audiorl.data.synth import HOTWORDS, SynthSettings, add_noise, noise, plan, synthesize, template_sentences
from audiorl.errors import ConfigError, DataError


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_noise_lands_at_the_asked_snr():
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 4) / 16000
    speech = (0.3 * np.sin(2 * np.pi * 220 * t) * (t % 1 < 0.7)).astype(np.float32)  # voiced 70% of the time
    for snr in (0.0, 10.0, 20.0):
        noisy = add_noise(speech, snr, rng)
        voiced = np.abs(speech) > 1e-4
        measured = 10 * np.log10(np.mean(speech[voiced] ** 2) / np.mean((noisy - speech) ** 2))
        assert abs(measured - snr) < 0.1, (snr, measured)


def _band_density(samples: np.ndarray, low: float, high: float) -> float:
    """Mean power per spectral bin between `low` and `high` Hz."""
    spectrum = np.abs(np.fft.rfft(samples)) ** 2
    freqs = np.fft.rfftfreq(len(samples), d=1 / 16000)
    return float(spectrum[(freqs >= low) & (freqs < high)].mean())


def test_noise_kinds_have_their_spectral_slopes_and_the_asked_snr():
    # per-bin power at 8x the frequency: white the same, pink 1/8 (-9 dB), brown 1/64 (-18 dB)
    for kind, ratio in (("white", 1.0), ("pink", 8.0), ("brown", 64.0)):
        samples = noise(16000 * 8, np.random.default_rng(1), kind)
        assert np.mean(samples**2) == pytest.approx(1.0, rel=0.05)
        measured = _band_density(samples, 250, 500) / _band_density(samples, 2000, 4000)
        assert ratio / 1.3 < measured < ratio * 1.3, (kind, measured)
    t = np.arange(16000 * 2) / 16000
    speech = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    noisy = add_noise(speech, 10.0, np.random.default_rng(0), "pink")
    assert 10 * np.log10(np.mean(speech**2) / np.mean((noisy - speech) ** 2)) == pytest.approx(10.0, abs=0.1)
    with pytest.raises(ConfigError, match="noise kind 'babble': use one of white, pink, brown"):
        noise(100, np.random.default_rng(0), "babble")


def test_a_corpus_speaks_its_noise_kind_and_says_so(tmp_path):
    common = dict(num_sentences=8, utterances_per_sentence=1, heldout_sentence_share=0.25, accents=["en-us"], heldout_accents=[],
                  variants=[""], noise_share=1.0, noisy_validation=True, seed=2)
    white = synthesize(SynthSettings(out=tmp_path / "white", **common))
    pink = synthesize(SynthSettings(out=tmp_path / "pink", noise_kind="pink", **common))
    rows = {kind: _rows(summary.out / "validation-noisy.jsonl") for kind, summary in (("white", white), ("pink", pink))}
    # the same sentences, voices and SNRs: only the noise's colour differs
    assert [(r["text"], r["voice"], r["snr_db"]) for r in rows["white"]] == [(r["text"], r["voice"], r["snr_db"]) for r in rows["pink"]]
    assert {r["noise"] for r in rows["pink"]} == {"pink"} and {r["noise"] for r in rows["white"]} == {"white"}
    assert all(r["noise"] is None for r in _rows(pink.out / "validation.jsonl"))  # clean clips name no noise
    low_share = {}
    for kind, summary in (("white", white), ("pink", pink)):
        audio = np.concatenate([sf.read(summary.out / r["audio"], dtype="float32")[0] for r in rows[kind]])
        clean = np.concatenate([sf.read(summary.out / r["audio"], dtype="float32")[0] for r in _rows(summary.out / "validation.jsonl")])
        # espeak-ng has little energy above 6 kHz: there the noise is nearly all there is
        low_share[kind] = _band_density(audio, 6000, 8000) / max(_band_density(clean, 6000, 8000), 1e-12)
    assert low_share["white"] > 3 * low_share["pink"]
    with pytest.raises(ConfigError, match="noise kind 'hum'"):
        synthesize(SynthSettings(out=tmp_path / "x", noise_kind="hum", **common))


def test_templates_make_distinct_sentences_of_three_to_ten_words():
    import random

    sentences = template_sentences(300, random.Random(1))
    assert len(set(sentences)) == 300
    assert all(3 <= len(s.split()) <= 10 for s in sentences)
    assert any(h in s.split() for s in sentences for h in HOTWORDS)


def test_a_corpus_holds_out_sentences_and_accents(tmp_path):
    settings = SynthSettings(out=tmp_path / "corpus", num_sentences=40, utterances_per_sentence=2, heldout_sentence_share=0.2,
                             accents=["en-us", "en-gb", "en-029"], heldout_accents=["en-029"], variants=["", "+f3", "+m2"],
                             noise_share=0.5, snr_db=(8.0, 12.0), seed=3)
    summary = synthesize(settings)
    out = settings.out
    splits = {p.stem: _rows(p) for p in out.glob("*.jsonl")}
    assert set(splits) == {"train", "validation", "heldout-voices-clean", "heldout-voices-noisy", "hotwords"}
    assert summary.counts == {k: len(v) for k, v in splits.items()}
    assert len(splits["train"]) == 32 * 2 and len(splits["validation"]) == 8

    train_texts = {r["text"] for r in splits["train"]}
    for name in ("validation", "heldout-voices-clean", "heldout-voices-noisy"):
        assert not train_texts & {r["text"] for r in splits[name]}, name  # held-out sentences
    accent = lambda r: r["voice"].split("+")[0]  # noqa: E731
    assert {accent(r) for r in splits["train"] + splits["validation"]} <= {"en-us", "en-gb"}
    assert {accent(r) for r in splits["heldout-voices-clean"] + splits["heldout-voices-noisy"]} == {"en-029"}
    assert all(r["snr_db"] is None for r in splits["heldout-voices-clean"] + splits["validation"])
    assert all(8.0 <= r["snr_db"] <= 12.0 for r in splits["heldout-voices-noisy"])
    assert 0 < sum(r["snr_db"] is not None for r in splits["train"]) < len(splits["train"])
    assert all(r["hotwords"] and set(r["hotwords"]) <= set(HOTWORDS) for r in splits["hotwords"])
    assert {r["audio"] for r in splits["hotwords"]} <= {r["audio"] for r in splits["heldout-voices-clean"] + splits["heldout-voices-noisy"]}

    for row in splits["heldout-voices-noisy"][:3] + splits["train"][:3]:
        info = sf.info(out / row["audio"])
        assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
        assert abs(info.duration - row["seconds"]) < 0.01
    # the manifests load as AudioRL data, extra columns kept for rewards
    records = read_records(out / "hotwords.jsonl", "transcript")
    good, bad = validate_records(records, AudioLimits(sampling_rate=16000, max_seconds=10), on_bad="error")
    assert not bad and good[0].extra["hotwords"]

    # the same seed plans the same corpus
    again = plan(settings)
    assert [(j.text, j.voice, j.speed, j.snr_db) for j in again if j.split == "train"] == [
        (r["text"], r["voice"], r["speed"], r["snr_db"]) for r in splits["train"]]


def test_sentences_from_a_file_and_clear_errors(tmp_path):
    text = tmp_path / "sentences.txt"
    text.write_text("call the bank\nopen the door now\nplay some music\nclose the window\n\ncall the bank\n")
    out = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "data", "synth", "--out", str(tmp_path / "c"), "--text", str(text),
                          "--accents", "en-us,en-gb", "--heldout-accents", "en-gb", "--variants", ",+f2", "--heldout-sentence-share", "0.5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    texts = {r["text"] for p in (tmp_path / "c").glob("*.jsonl") for r in _rows(p)}
    assert texts == {"call the bank", "open the door now", "play some music", "close the window"}

    bad_voice = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "data", "synth", "--out", str(tmp_path / "d"),
                                "--accents", "en-us,xx-nowhere", "--heldout-accents", "xx-nowhere"],
                               capture_output=True, text=True, timeout=120)
    assert bad_voice.returncode == 3 and "xx-nowhere" in bad_voice.stderr

    # no espeak-ng on the PATH: say how to install it
    # (the interpreter by its own path: a link to a virtualenv's python elsewhere would leave the virtualenv)
    bare = tmp_path / "bin"
    bare.mkdir()
    missing = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "data", "synth", "--out", str(tmp_path / "e")],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": str(bare)})
    assert missing.returncode == 6 and "apt-get install espeak-ng" in missing.stderr
    assert shutil.which("espeak-ng")  # the rest of the suite still has it


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no training clip"):
        synthesize(SynthSettings(out=tmp_path / "x", num_sentences=8, accents=["en-us", "en-gb"], heldout_accents=["en-gb"],
                                 variants=[""], max_seconds=0.1))


def test_the_cli_defaults_are_the_library_defaults():
    # the CLI repeats them so that `audiorl --help` imports no audio stack; they must not drift
    from audiorl.data import synth
    from audiorl_cli import main

    assert main.ACCENTS_DEFAULT == synth.ACCENTS
    assert main.HELDOUT_DEFAULT == synth.HELDOUT_ACCENTS
    assert main.VARIANTS_DEFAULT == synth.VARIANTS


def test_a_tuning_corpus_in_the_held_out_accents_never_speaks_a_test_sentence(tmp_path):
    # the recipe for preference tuning: every accent of the new corpus is one the base never heard,
    # nothing is held out by accent, and the base corpus's test sentences are excluded
    base = synthesize(SynthSettings(out=tmp_path / "base", num_sentences=30, utterances_per_sentence=1, heldout_sentence_share=0.3,
                                    accents=["en-us", "en-029"], heldout_accents=["en-029"], variants=[""], seed=0))
    test_texts = {r["text"] for r in _rows(base.out / "heldout-voices-clean.jsonl")}
    out = subprocess.run([sys.executable, "-m", "audiorl_cli.main", "data", "synth", "--out", str(tmp_path / "tune"),
                          "--num-sentences", "30", "--utterances-per-sentence", "1", "--accents", "en-029", "--heldout-accents", "",
                          "--variants", ",+f2", "--noisy-validation", "--seed", "0",
                          "--exclude", str(base.out / "heldout-voices-clean.jsonl")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tune = {p.stem: _rows(p) for p in (tmp_path / "tune").glob("*.jsonl")}
    assert set(tune) == {"train", "validation", "validation-noisy"}
    spoken = {r["text"] for rows in tune.values() for r in rows}
    assert len(spoken) == 30 and not spoken & test_texts  # same seed, same templates: only the exclusion keeps them apart
    assert [r["text"] for r in tune["validation"]] == [r["text"] for r in tune["validation-noisy"]]
    assert all(r["snr_db"] is None for r in tune["validation"]) and all(r["snr_db"] is not None for r in tune["validation-noisy"])
    assert {r["voice"].split("+")[0] for rows in tune.values() for r in rows} == {"en-029"}
    assert json.loads((tmp_path / "tune" / "synth.json").read_text())["excluded_sentences"] == len(test_texts)


def test_clips_without_speech_join_train_and_validation_and_leave_the_speech_as_it_was(tmp_path):
    common = dict(num_sentences=20, utterances_per_sentence=1, heldout_sentence_share=0.25, accents=["en-us", "en-029"],
                  heldout_accents=["en-029"], variants=[""], seed=5)
    plain = plan(SynthSettings(out=tmp_path / "a", **common))
    settings = SynthSettings(out=tmp_path / "b", no_speech_share=0.2, no_speech_level_db=(-40.0, -30.0), **common)
    assert [(j.split, j.text, j.voice, j.speed) for j in plan(settings)][: len(plain)] == [(j.split, j.text, j.voice, j.speed) for j in plain]
    synthesize(settings)
    splits = {p.stem: _rows(p) for p in settings.out.glob("*.jsonl")}
    for split, speech_clips in (("train", 15), ("validation", 5)):
        silent = [r for r in splits[split] if r.get("no_speech")]
        assert len(splits[split]) - len(silent) == speech_clips and len(silent) == round(speech_clips * 0.2)
        for row in silent:
            assert row["text"] == "" and -40.0 <= row["level_db"] <= -30.0
            samples, rate = sf.read(settings.out / row["audio"], dtype="float32")
            assert rate == 16000 and 1.0 <= len(samples) / rate <= 4.0
            assert abs(20 * np.log10(np.sqrt(np.mean(samples**2))) - row["level_db"]) < 0.5
    assert not any(r.get("no_speech") for r in splits["heldout-voices-clean"] + splits["heldout-voices-noisy"])
    # they load as transcript records whose reference is empty, the no_speech column kept for the rewards
    records = read_records(settings.out / "validation.jsonl", "transcript")
    silent = [r for r in records if r.extra.get("no_speech")]
    assert silent and all(r.reference == "" for r in silent)
    with pytest.raises(Exception, match="no_speech_share"):
        synthesize(SynthSettings(out=tmp_path / "c", no_speech_share=1.5, **common))
