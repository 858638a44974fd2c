"""A spoken corpus made with espeak-ng: sentences from a text file or built-in templates, spoken
in many accents and voice variants at varied speed and pitch, with leading and trailing silence
and, for some clips, noise at a chosen SNR (white, pink or brown: one kind per corpus, so that a
test set can hold a kind the tuning data never had); resampled to 16 kHz; split so that evaluation
holds out whole sentences and whole accents.

Splits (one JSONL manifest each, audio paths relative to it):
- `train`: training sentences in the training accents;
- `validation`: held-out sentences in the training accents (new words in familiar voices);
- `validation-noisy` (on request): the same sentences again, in new draws of those voices, with noise;
- `heldout-voices-clean` and `heldout-voices-noisy`: held-out sentences in the held-out accents,
  without and with noise (neither voice nor sentence was heard in training);
- `hotwords`: the held-out-voice clips whose sentence contains a hotword, with a `hotwords` column
  for the hotword reward.

On request (`no_speech_share`), `train` and `validation` also get clips with no speech in them:
silence with a little hiss up to clearly audible noise (of the corpus's kind), an empty `text` and `no_speech:
true`, which is what the hallucination reward and the evaluation's `no_speech_output_rate` read.

Every speech record carries `text`, `voice`, `speed`, `pitch`, `snr_db` (null for clean clips)
and `hotwords` (possibly empty); a no-speech record carries `text: ""`, `no_speech: true` and
`level_db` (the noise's RMS level in dB full scale).
"""

from __future__ import annotations

import json
import random
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from audiorl.audio import resample, to_mono
from audiorl.data.speech import espeak_binary, speak
from audiorl.errors import ConfigError, DataError
from audiorl.progress import progress_bar

SAMPLING_RATE = 16000
ACCENTS = ["en-us", "en-gb", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-scotland", "en-029"]
HELDOUT_ACCENTS = ["en-gb-scotland", "en-029"]
VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5"]
HOTWORDS = ["zentrix", "kalora", "novabank", "vireo", "quillon", "orbita"]

_NAMES = ["anna", "ben", "carlos", "diana", "ethan", "fatima", "george", "hana", "ivan", "julia", "kenji", "laura", "mohammed",
          "nora", "oliver", "priya", "quentin", "rosa", "samuel", "tara"]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "fifteen",
            "twenty", "thirty", "forty", "fifty", "hundred"]
_PLACES = ["kitchen", "office", "garage", "station", "airport", "museum", "library", "hospital", "bakery", "garden", "harbour",
           "stadium"]
_THINGS = ["lights", "heating", "music", "alarm", "camera", "printer", "report", "invoice", "ticket", "parcel", "meeting",
           "timer", "window", "account", "battery", "message"]
_VERBS = ["turn on", "turn off", "check", "open", "close", "send", "cancel", "book", "find", "order", "call", "move", "play",
          "pause", "share", "print"]
_TIMES = ["today", "tomorrow", "tonight", "this morning", "next week", "on monday", "on friday", "after lunch", "at noon",
          "in the evening"]
_TEMPLATES = [
    "{verb} the {thing} in the {place}",
    "please {verb} the {thing} {time}",
    "{name} will {verb} the {thing} {time}",
    "ask {name} to {verb} the {thing}",
    "set a timer for {number} minutes",
    "the {thing} costs {number} dollars",
    "meet {name} at the {place} at {number}",
    "open {hotword} and {verb} the {thing}",
    "transfer {number} dollars with {hotword}",
    "{hotword} says the {thing} is ready {time}",
    "is the {place} open {time}",
    "{name} lost the {thing} at the {place}",
]


def template_sentences(count: int, rng: random.Random, random_share: float = 0.15, exclude: frozenset[str] = frozenset()) -> list[str]:
    """`count` distinct sentences of 3-10 words from the templates, plus a share of random word
    strings (so that a model cannot lean on templates alone); none of them in `exclude`."""
    vocabulary = sorted({w for group in (_NAMES, _NUMBERS, _PLACES, _THINGS, _TIMES, _VERBS) for item in group for w in item.split()})
    seen: dict[str, None] = {}
    attempts = 0
    while len(seen) < count:
        attempts += 1
        if attempts > count * 200:
            raise ConfigError(f"the templates cannot make {count} distinct sentences; give a text file (--text)")
        if rng.random() < random_share:
            sentence = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 8)))
        else:
            sentence = rng.choice(_TEMPLATES).format(
                verb=rng.choice(_VERBS), thing=rng.choice(_THINGS), place=rng.choice(_PLACES), time=rng.choice(_TIMES),
                name=rng.choice(_NAMES), number=rng.choice(_NUMBERS), hotword=rng.choice(HOTWORDS))
        if 3 <= len(sentence.split()) <= 10 and sentence not in exclude:
            seen.setdefault(sentence, None)
    return list(seen)


def read_sentences(path: Path) -> list[str]:
    """One sentence per line of a text file."""
    try:
        return Path(path).read_text().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the sentences ({exc.strerror})") from None


def _hotwords(text: str) -> list[str]:
    words = text.split()
    return [w for w in HOTWORDS if w in words]


NOISE_KINDS = ("white", "pink", "brown")


def check_noise_kind(kind: str) -> None:
    if kind not in NOISE_KINDS:
        raise ConfigError(f"noise kind {kind!r}: use one of {', '.join(NOISE_KINDS)}")


def noise(length: int, rng: np.random.Generator, kind: str = "white") -> np.ndarray:
    """`length` samples of unit-power noise: white (flat spectrum), pink (power falling 3 dB per
    octave, 1/f) or brown (6 dB per octave, 1/f^2), shaped in the frequency domain."""
    check_noise_kind(kind)
    white = rng.standard_normal(length)
    if kind == "white" or length < 2:
        return white
    spectrum = np.fft.rfft(white)
    freqs = np.fft.rfftfreq(length, d=1.0 / SAMPLING_RATE)
    freqs[0] = freqs[1]  # no infinite gain at 0 Hz
    spectrum /= np.sqrt(freqs) if kind == "pink" else freqs
    out = np.fft.irfft(spectrum, n=length)
    out = out - out.mean()
    return out / max(float(np.sqrt(np.mean(out**2))), 1e-12)


def add_noise(samples: np.ndarray, snr_db: float, rng: np.random.Generator, kind: str = "white") -> np.ndarray:
    """Noise of `kind` at `snr_db` relative to the clip's power over its voiced part."""
    voiced = samples[np.abs(samples) > 1e-4]
    power = float(np.mean((voiced if voiced.size else samples) ** 2))
    return (samples + noise(samples.shape[0], rng, kind).astype(np.float32) * np.sqrt(power / 10 ** (snr_db / 10))).astype(np.float32)


@dataclass
class SynthSettings:
    out: Path
    sentences: list[str] | None = None  # None: from the templates
    num_sentences: int = 400
    accents: list[str] = field(default_factory=lambda: list(ACCENTS))
    heldout_accents: list[str] = field(default_factory=lambda: list(HELDOUT_ACCENTS))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    utterances_per_sentence: int = 4  # training sentences: this many (voice, speed, pitch) draws each
    heldout_sentence_share: float = 0.15
    speed: tuple[int, int] = (130, 200)
    pitch: tuple[int, int] = (25, 75)
    silence_s: tuple[float, float] = (0.05, 0.4)
    noise_share: float = 0.3  # training clips with noise
    snr_db: tuple[float, float] = (5.0, 20.0)
    noise_kind: str = "white"  # white, pink or brown: every noisy and no-speech clip of the corpus
    max_seconds: float = 10.0
    seed: int = 0
    workers: int = 2
    exclude: frozenset[str] = frozenset()  # sentences never spoken (another corpus's test set)
    noisy_validation: bool = False  # also speak the validation sentences with noise (`validation-noisy`)
    no_speech_share: float = 0.0  # add this many no-speech clips per speech clip to train and validation
    no_speech_level_db: tuple[float, float] = (-70.0, -25.0)  # their noise level, dB full scale (RMS)


@dataclass
class _Job:
    split: str
    index: int
    text: str
    voice: str
    speed: int
    pitch: int
    lead: float
    tail: float
    snr_db: float | None
    seed: int
    level_db: float | None = None  # a clip with no speech: noise at this RMS level (dBFS)
    noise: str = "white"


@dataclass
class SynthSummary:
    out: Path
    counts: dict[str, int]
    hours: dict[str, float]
    dropped: list[str]

    def lines(self) -> list[str]:
        rows = [f"{split:22} {n:6d} clips  {self.hours[split] * 60:7.1f} min" for split, n in self.counts.items()]
        if self.dropped:
            rows.append(f"dropped {len(self.dropped)} clip(s) over the length limit (listed in {self.out / 'dropped.jsonl'})")
        return rows


def _check(settings: SynthSettings) -> None:
    unknown = [a for a in settings.heldout_accents if a not in settings.accents]
    if unknown:
        raise ConfigError(f"held-out accents {unknown} are not among the accents {settings.accents}")
    if not [a for a in settings.accents if a not in settings.heldout_accents]:
        raise ConfigError("every accent is held out: keep at least one for training")
    if not 0 < settings.heldout_sentence_share < 1:
        raise ConfigError("heldout_sentence_share must lie between 0 and 1")
    check_noise_kind(settings.noise_kind)
    if not 0 <= settings.no_speech_share <= 1:
        raise ConfigError(f"no_speech_share {settings.no_speech_share}: give a share between 0 and 1")
    # a clear error for an unknown accent or variant now, not after an hour of work
    probes = [a + settings.variants[0] for a in settings.accents] + [settings.accents[0] + v for v in settings.variants]
    with tempfile.TemporaryDirectory() as tmp:
        for voice in dict.fromkeys(probes):
            speak("test", Path(tmp) / "probe.wav", voice=voice)


def plan(settings: SynthSettings) -> list[_Job]:
    """Which sentence goes to which split, in which voice: reproducible from the seed."""
    rng = random.Random(settings.seed)
    if settings.sentences is not None:
        sentences = [s.strip() for s in settings.sentences if s.strip() and s.strip() not in settings.exclude]
    else:
        sentences = template_sentences(settings.num_sentences, rng, exclude=settings.exclude)
    sentences = list(dict.fromkeys(sentences))
    if len(sentences) < 4:
        raise ConfigError(f"{len(sentences)} distinct sentences: give at least 4")
    # hold out the same share of hotword sentences as of the others, so the hotword split is not
    # left to chance
    held, train = [], []
    groups = ([t for t in sentences if _hotwords(t)], [t for t in sentences if not _hotwords(t)])
    for group in groups:
        rng.shuffle(group)
        n_held = round(len(group) * settings.heldout_sentence_share)
        held += group[:n_held]
        train += group[n_held:]
    while len(held) < 2:
        held.append(train.pop())
    train_accents = [a for a in settings.accents if a not in settings.heldout_accents]
    jobs: list[_Job] = []
    counts: dict[str, int] = {}

    def add(split: str, text: str, accents: list[str], noisy: bool | None) -> None:
        snr = None
        if noisy if noisy is not None else rng.random() < settings.noise_share:
            snr = round(rng.uniform(*settings.snr_db), 1)
        counts[split] = counts.get(split, 0) + 1
        jobs.append(_Job(split, counts[split] - 1, text, rng.choice(accents) + rng.choice(settings.variants),
                         rng.randint(*settings.speed), rng.randint(*settings.pitch), round(rng.uniform(*settings.silence_s), 3),
                         round(rng.uniform(*settings.silence_s), 3), snr, rng.randrange(2**31), noise=settings.noise_kind))

    for text in train:
        for _ in range(settings.utterances_per_sentence):
            add("train", text, train_accents, None)
    for text in held:
        add("validation", text, train_accents, False)
        if settings.noisy_validation:
            add("validation-noisy", text, train_accents, True)
        if settings.heldout_accents:
            add("heldout-voices-clean", text, settings.heldout_accents, False)
            add("heldout-voices-noisy", text, settings.heldout_accents, True)
    # drawn after everything else, so that a corpus with them speaks the same clips as one without
    for split in ("train", "validation") if settings.no_speech_share > 0 else ():
        for _ in range(round(counts.get(split, 0) * settings.no_speech_share)):
            counts[split] += 1
            seconds = round(rng.uniform(1.0, max(1.0, min(4.0, settings.max_seconds))), 2)
            jobs.append(_Job(split, counts[split] - 1, "", "", 0, 0, seconds, 0.0, None, rng.randrange(2**31),
                             level_db=round(rng.uniform(*settings.no_speech_level_db), 1), noise=settings.noise_kind))
    return jobs


def _speech(job: _Job) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        raw = speak(job.text, Path(tmp) / "raw.wav", voice=job.voice, speed=job.speed, pitch=job.pitch)
        samples, rate = sf.read(raw, dtype="float32", always_2d=False)
    samples = resample(to_mono(samples), rate, SAMPLING_RATE).astype(np.float32)
    pad = lambda s: np.zeros(int(s * SAMPLING_RATE), dtype=np.float32)  # noqa: E731
    samples = np.concatenate([pad(job.lead), samples, pad(job.tail)])
    if job.snr_db is not None:
        samples = add_noise(samples, job.snr_db, np.random.default_rng(job.seed), job.noise)
    return samples


def _render(job: _Job, out: Path, max_seconds: float) -> dict | None:
    name = f"clips/{job.split}/{job.index:06d}.wav"
    if job.level_db is not None:  # no speech: noise at the job's level for `lead` seconds
        samples = (noise(int(job.lead * SAMPLING_RATE), np.random.default_rng(job.seed), job.noise) * 10 ** (job.level_db / 20)).astype(np.float32)
        record = {"audio": name, "text": "", "no_speech": True, "level_db": job.level_db, "noise": job.noise, "hotwords": [],
                  "seconds": job.lead}
    else:
        samples = _speech(job)
        seconds = len(samples) / SAMPLING_RATE
        record = {"audio": name, "text": job.text, "voice": job.voice, "speed": job.speed, "pitch": job.pitch,
                  "snr_db": job.snr_db, "noise": job.noise if job.snr_db is not None else None, "hotwords": _hotwords(job.text),
                  "seconds": round(seconds, 3)}
        if seconds > max_seconds:
            return {**record, "dropped": f"{seconds:.1f} s is over {max_seconds} s"}
    peak = float(np.max(np.abs(samples)))
    path = out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples / peak if peak > 1.0 else samples, SAMPLING_RATE, subtype="PCM_16")
    return record


def synthesize(settings: SynthSettings) -> SynthSummary:
    """Speak the corpus into `settings.out`: clips under clips/<split>/ and one manifest per split."""
    espeak_binary()  # ToolMissingError with the install hint when absent
    _check(settings)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(settings)
    records: dict[str, list[dict]] = {}
    dropped: list[dict] = []
    with progress_bar("speaking the corpus", total=len(jobs)) as advance, ThreadPoolExecutor(max(1, settings.workers)) as pool:
        for job, record in zip(jobs, pool.map(lambda j: _render(j, out, settings.max_seconds), jobs)):
            if "dropped" in record:
                dropped.append(record)
            else:
                records.setdefault(job.split, []).append(record)
            advance()
    if settings.heldout_accents:
        records["hotwords"] = [r for split in ("heldout-voices-clean", "heldout-voices-noisy") for r in records.get(split, []) if r["hotwords"]]
    records = {split: rows for split, rows in records.items() if rows}  # an empty manifest is no data set
    for split, rows in records.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if dropped:
        (out / "dropped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dropped))
    if not records.get("train"):
        raise DataError(f"{out}: no training clip was written (all {len(dropped)} over {settings.max_seconds} s?)")
    settings_record = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.__dict__.items() if k not in ("sentences", "exclude")}
    settings_record["excluded_sentences"] = len(settings.exclude)
    (out / "synth.json").write_text(json.dumps({**settings_record, "counts": {k: len(v) for k, v in records.items()}}, indent=2))
    hours = {split: sum(r["seconds"] for r in rows) / 3600 for split, rows in records.items()}
    return SynthSummary(out, {k: len(v) for k, v in records.items()}, hours, [r["audio"] for r in dropped])
