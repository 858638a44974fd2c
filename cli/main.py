"""The `audiorl` command: parse, call the library, print.

Heavy imports (torch, transformers, mlflow) happen inside the commands that need them, so
`audiorl --help` and `audiorl config show` stay fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="audiorl",
    help="Preference tuning and RL for speech recognition and audio language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(help="Build and check datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
tracking_app = typer.Typer(help="MLflow housekeeping.", no_args_is_help=True)
app.add_typer(tracking_app, name="tracking")
model_app = typer.Typer(help="Make, import and export models.", no_args_is_help=True)
app.add_typer(model_app, name="model")

_state = {"debug": False}

# the synth defaults, repeated here so that `--help` imports no audio stack
ACCENTS_DEFAULT = ["en-us", "en-gb", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-scotland", "en-029"]
HELDOUT_DEFAULT = ["en-gb-scotland", "en-029"]
VARIANTS_DEFAULT = ["", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5"]

EncoderCacheOption = Annotated[
    Path | None,
    typer.Option(help="Keep the encoder states here: a run with model.freeze_encoder and this model.encoder_cache_dir "
                      "then reuses them for the same clips."),
]

NormalizerOption = Annotated[
    str,
    typer.Option(help="Text normaliser before scoring: plain (case and punctuation only), whisper_english "
                      "(Whisper's English normaliser: numbers, spellings, fillers) or whisper_basic."),
]

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key before validation: --set train.max_steps=100 (repeatable)."),
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


def _out():
    from audiorl.progress import RedactingConsole

    return RedactingConsole()


def _echo(message: str = "", err: bool = False) -> None:
    """typer.echo with secrets masked: every line a command prints goes through here or `_out()`."""
    from audiorl.secrets import redact

    typer.echo(redact(message), err=err)


@config_app.command("show")
def config_show(
    config: Annotated[Path, typer.Argument(help="YAML run file.")],
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of YAML.")] = False,
) -> None:
    """Print the resolved config: the file, overrides applied, every default filled in."""
    from audiorl.config import load_config

    cfg = load_config(config, set_ or [])
    _echo(json.dumps(cfg.to_dict(), indent=2) if as_json else cfg.to_yaml().rstrip())


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML run file.")],
    set_: SetOption = None,
) -> None:
    """Train a model as the run file says."""
    from audiorl.api import train as run_train

    outcome = run_train(config, set_ or [])
    out = _out()
    out.print(f"final model: {outcome.final_model_dir}")
    for name, before, after, cer in outcome.wer_by_set():
        was = f" (before: {before:.3f})" if before is not None else ""
        out.print(f"{name}: WER {after:.3f}{was}  CER {cer:.3f}")
    out.print(outcome.tracking)


def _test_sets(specs: list[str]) -> dict[str, str]:
    """`name=path` or `path` (named after the file) -> {name: path}."""
    from audiorl.errors import ConfigError

    sets: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not name or not path:
            raise ConfigError(f"--data {spec!r}: expected NAME=MANIFEST or MANIFEST")
        if name in sets:
            raise ConfigError(f"--data {spec!r}: test set name {name!r} given twice; use NAME=MANIFEST")
        sets[name] = path  # a local path or a URL (s3://...), as the library reads it
    return sets


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="Model directory (save_pretrained) or hub id.")],
    data: Annotated[
        list[str], typer.Option("--data", "-d", help="Test set: MANIFEST or NAME=MANIFEST (JSONL or saved dataset); repeatable.")
    ],
    family: Annotated[str | None, typer.Option(help="Model family (default: read from the model's config.json).")] = None,
    language: Annotated[str, typer.Option(help="Language of the speech.")] = "en",
    batch_size: Annotated[int, typer.Option(help="Clips per batch.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Longest transcript to generate.")] = 128,
    lowercase: Annotated[bool, typer.Option("--lowercase/--keep-case", help="Lower-case before scoring.")] = True,
    remove_punctuation: Annotated[
        bool, typer.Option("--remove-punctuation/--keep-punctuation", help="Strip punctuation before scoring.")
    ] = True,
    normalizer: NormalizerOption = "plain",
    skip_bad: Annotated[bool, typer.Option("--skip-bad-records", help="Skip unusable records instead of stopping.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the full results (per utterance) as JSON.")] = None,
    worst: Annotated[int, typer.Option(help="How many of the worst utterances to print per test set.")] = 5,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    baseline: Annotated[str | None, typer.Option(help="Also evaluate this model (e.g. the base) and compare.")] = None,
    log: Annotated[bool, typer.Option("--log/--no-log", help="Log the evaluation to MLflow ($MLFLOW_TRACKING_URI or ./mlruns).")] = True,
    experiment: Annotated[str, typer.Option(help="MLflow experiment for the evaluation.")] = "audiorl-eval",
    run_name: Annotated[str | None, typer.Option(help="MLflow run name.")] = None,
) -> None:
    """Transcribe one or more test sets (greedy decoding), report WER and CER for each, and log the
    evaluation to MLflow (a nested run per test set, the utterances worst first, a WER chart)."""
    from audiorl.api import evaluate_and_log

    results, before, run_id = evaluate_and_log(
        model,
        _test_sets(data),
        baseline=baseline,
        experiment=experiment,
        log=log,
        run_name=run_name,
        family=family,
        language=language,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        normalization=_normalization(normalizer, lowercase=lowercase, remove_punctuation=remove_punctuation),
        on_bad_record="skip" if skip_bad else "error",
        device=device,
    )
    out = _out()
    for name, result in results.items():
        was = f"  (baseline WER {before[name].wer:.4f})" if before else ""
        out.print(
            f"{name}: WER {result.wer:.4f}  CER {result.cer:.4f}  (S {result.substitutions}, D {result.deletions}, "
            f"I {result.insertions}; sentence error rate {result.sentence_error_rate:.3f}; "
            f"{result.num_utterances} utterances, {result.decoding} decoding){was}"
        )
        if result.no_speech_output_rate is not None:
            out.print(f"  clips without speech: {result.no_speech_clips}, transcribed as something: {result.no_speech_output_rate:.1%}")
        if result.hotword_recall is not None:
            out.print(f"  hotwords: {result.hotwords_expected} in the references, recall {result.hotword_recall:.1%}")
        for utt in sorted(result.utterances, key=lambda u: -u.wer)[:worst]:
            out.print(f"  {utt.wer:5.2f}  {utt.source}\n         ref: {utt.reference}\n         hyp: {utt.hypothesis}")
    if output:
        output.write_text(json.dumps({name: r.to_dict() for name, r in results.items()}, indent=2))
        out.print(f"full results: {output}")
    if run_id:
        out.print(f"logged to MLflow: run {run_id} in experiment '{experiment}'")


def _normalization(normalizer: str, **switches):
    from pydantic import ValidationError

    from audiorl.config import TextNormalization
    from audiorl.errors import ConfigError

    try:
        return TextNormalization(normalizer=normalizer, **switches)
    except ValidationError:
        raise ConfigError(f"--normalizer {normalizer!r}: use plain, whisper_english or whisper_basic") from None


ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model directory (save_pretrained) or hub id.")]
FamilyOption = Annotated[str | None, typer.Option(help="Model family (default: read from the model's config.json).")]


def _print_summary(summary, out_path: Path) -> None:
    out = _out()
    for line in summary.lines():
        out.print(line)
    out.print(f"written: {out_path}")


@data_app.command("pairs")
def data_pairs(
    model: ModelOption,
    data: Annotated[str, typer.Option("--data", "-d", help="Transcript manifest: {audio, text} per line (a path or a URL).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Preference manifest to write.")],
    family: FamilyOption = None,
    output_format: Annotated[
        str, typer.Option("--format", help="pairs ({audio, chosen, rejected}) or unpaired ({audio, completion, label}, for KTO).")
    ] = "pairs",
    good_wer: Annotated[float, typer.Option(help="--format unpaired: a transcript at or below this WER is desirable.")] = 0.1,
    bad_wer: Annotated[float, typer.Option(help="--format unpaired: a transcript at or above this WER is undesirable.")] = 0.3,
    num_samples: Annotated[int, typer.Option(help="Hypotheses sampled per clip.")] = 8,
    policy: Annotated[str, typer.Option(help="best-worst, reference-worst, or all (every pair past the margin).")] = "best-worst",
    min_wer_margin: Annotated[float, typer.Option(help="Least WER difference between chosen and rejected.")] = 0.1,
    max_pairs_per_clip: Annotated[int, typer.Option(help="With --policy all: most pairs per clip.")] = 4,
    dropout_ntp: Annotated[
        str | None, typer.Option(help="mask or noise: rejected = the reference's first part continued without the audio.")
    ] = None,
    start_ratio: Annotated[float, typer.Option(help="DropoutNTP: share of the reference kept before continuing.")] = 0.5,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Top-k sampling (0: off).")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Longest hypothesis.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Clips per batch.")] = 8,
    language: Annotated[str, typer.Option(help="Language of the speech.")] = "en",
    normalizer: NormalizerOption = "plain",
    encoder_cache_dir: EncoderCacheOption = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Sample N hypotheses per clip, rank them by WER, write preference pairs (or KTO's unpaired rows)."""
    from audiorl.api import make_pairs
    from audiorl.errors import ConfigError

    if output_format not in ("pairs", "unpaired"):
        raise ConfigError(f"--format {output_format!r}: use pairs or unpaired")
    if policy not in ("best-worst", "reference-worst", "all"):
        raise ConfigError(f"--policy {policy!r}: use best-worst, reference-worst or all")
    if dropout_ntp not in (None, "mask", "noise"):
        raise ConfigError(f"--dropout-ntp {dropout_ntp!r}: use mask or noise")
    summary = make_pairs(
        model, data, out, family=family, language=language, device=device, temperature=temperature, top_p=top_p,
        top_k=top_k, max_new_tokens=max_new_tokens, num_samples=num_samples, policy=policy, min_wer_margin=min_wer_margin,
        max_pairs_per_clip=max_pairs_per_clip, dropout_ntp=dropout_ntp, start_ratio=start_ratio, batch_size=batch_size, seed=seed,
        normalization=_normalization(normalizer), encoder_cache_dir=encoder_cache_dir, output_format=output_format, good_wer=good_wer,
        bad_wer=bad_wer,
    )
    _print_summary(summary, out)


@data_app.command("hard-cases")
def data_hard_cases(
    model: ModelOption,
    data: Annotated[str, typer.Option("--data", "-d", help="Transcript manifest (hotwords, no_speech columns are used; a path or a URL).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest of hard (and some easy) clips to write.")],
    family: FamilyOption = None,
    wer_threshold: Annotated[float, typer.Option(help="Greedy WER from which a clip is hard.")] = 0.3,
    num_samples: Annotated[int, typer.Option(help="Hypotheses sampled per clip to measure disagreement.")] = 4,
    disagreement_threshold: Annotated[float, typer.Option(help="Mean pairwise WER of the samples from which a clip is hard.")] = 0.3,
    easy_fraction: Annotated[float, typer.Option(help="Share of the easy clips kept against forgetting.")] = 0.1,
    max_new_tokens: Annotated[int, typer.Option(help="Longest transcript.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Clips per batch.")] = 8,
    language: Annotated[str, typer.Option(help="Language of the speech.")] = "en",
    normalizer: NormalizerOption = "plain",
    encoder_cache_dir: EncoderCacheOption = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling and the easy share.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Score a model on a manifest and keep the clips where it fails, with the reasons."""
    from audiorl.api import make_hard_cases

    summary = make_hard_cases(
        model, data, out, family=family, language=language, device=device, wer_threshold=wer_threshold,
        num_samples=num_samples, disagreement_threshold=disagreement_threshold, easy_fraction=easy_fraction,
        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, normalization=_normalization(normalizer),
        encoder_cache_dir=encoder_cache_dir,
    )
    _print_summary(summary, out)


def _range(text: str, what: str, kind=float):
    from audiorl.errors import ConfigError

    low, sep, high = text.partition(":")
    try:
        return (kind(low), kind(high or low))
    except ValueError:
        raise ConfigError(f"--{what} {text!r}: expected LOW:HIGH, for example 130:200") from None


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the clips and the split manifests.")],
    text: Annotated[Path | None, typer.Option(help="Sentences, one per line (default: built-in templates with names, numbers and hotwords).")] = None,
    num_sentences: Annotated[int, typer.Option(help="Distinct template sentences (without --text).")] = 400,
    utterances_per_sentence: Annotated[int, typer.Option(help="Training clips per training sentence, each in a random voice.")] = 4,
    accents: Annotated[str, typer.Option(help="espeak-ng accents, comma-separated.")] = ",".join(ACCENTS_DEFAULT),
    heldout_accents: Annotated[
        str, typer.Option(help="Accents kept out of training (evaluation only), comma-separated.")
    ] = ",".join(HELDOUT_DEFAULT),
    variants: Annotated[
        str, typer.Option(help="Voice variants (espeak-ng +m1.. +f5), comma-separated; an empty item is the plain voice.")
    ] = ",".join(VARIANTS_DEFAULT),
    heldout_sentence_share: Annotated[float, typer.Option(help="Share of sentences kept for validation and held-out voices.")] = 0.15,
    speed: Annotated[str, typer.Option(help="Words per minute, LOW:HIGH.")] = "130:200",
    pitch: Annotated[str, typer.Option(help="espeak-ng pitch, LOW:HIGH (0-99).")] = "25:75",
    noise_share: Annotated[float, typer.Option(help="Share of training clips with noise.")] = 0.3,
    noise_kind: Annotated[str, typer.Option(help="The corpus's noise: white, pink (1/f) or brown (1/f^2); no-speech clips too.")] = "white",
    snr: Annotated[str, typer.Option(help="Signal-to-noise ratio of noisy clips in dB, LOW:HIGH.")] = "5:20",
    max_seconds: Annotated[float, typer.Option(help="Longer clips are dropped (and listed).")] = 10.0,
    seed: Annotated[int, typer.Option(help="Seed for sentences, voices and noise.")] = 0,
    workers: Annotated[int, typer.Option(help="Clips spoken in parallel.")] = 2,
    exclude: Annotated[
        list[Path] | None, typer.Option(help="A manifest whose sentences must not be spoken (another corpus's test set); repeatable.")
    ] = None,
    noisy_validation: Annotated[bool, typer.Option(help="Also speak the validation sentences with noise (split validation-noisy).")] = False,
    no_speech_share: Annotated[
        float, typer.Option(help="No-speech clips (silence or noise, empty transcript) added to train and validation, per speech clip.")
    ] = 0.0,
) -> None:
    """Speak a corpus with espeak-ng: many accents and voices, silence and noise, split so that
    evaluation holds out whole sentences and whole accents; a JSONL manifest per split."""
    from audiorl.data.records import read_records
    from audiorl.data.synth import SynthSettings, read_sentences, synthesize

    excluded = frozenset(r.reference for path in exclude or [] for r in read_records(path, "transcript"))

    sentences = read_sentences(text) if text is not None else None
    split = lambda value: [v.strip() for v in value.split(",")]  # noqa: E731
    summary = synthesize(SynthSettings(
        out=out, sentences=sentences, num_sentences=num_sentences, utterances_per_sentence=utterances_per_sentence,
        accents=[a for a in split(accents) if a], heldout_accents=[a for a in split(heldout_accents) if a], variants=split(variants),
        heldout_sentence_share=heldout_sentence_share, speed=_range(speed, "speed", int), pitch=_range(pitch, "pitch", int),
        noise_share=noise_share, noise_kind=noise_kind, snr_db=_range(snr, "snr"), max_seconds=max_seconds, seed=seed, workers=workers,
        exclude=excluded, noisy_validation=noisy_validation, no_speech_share=no_speech_share,
    ))
    for line in summary.lines():
        _echo(line)
    _echo(f"written: {out}/<split>.jsonl")


@data_app.command("check")
def data_check(
    manifest: Annotated[str, typer.Argument(help="Manifest (AudioRL, NeMo or Lhotse JSONL) or saved dataset to check (a path or a URL).")],
    kind: Annotated[str, typer.Option(help="transcript, preference or unpaired.")] = "transcript",
    max_audio_seconds: Annotated[float, typer.Option(help="Longest clip allowed.")] = 30.0,
    sampling_rate: Annotated[int, typer.Option(help="The model's sampling rate (clips are resampled to it).")] = 16000,
) -> None:
    """Check every record: JSON, keys, text, hotwords, audio readable, complete, finite, not too short or long, not silence."""
    from audiorl.audio import AudioLimits
    from audiorl.data.builders import check_manifest
    from audiorl.errors import ConfigError, DataError

    if kind not in ("transcript", "preference", "unpaired"):
        raise ConfigError(f"--kind {kind!r}: use transcript, preference or unpaired")
    report = check_manifest(manifest, kind, AudioLimits(sampling_rate=sampling_rate, max_seconds=max_audio_seconds))
    out = _out()
    rates = ", ".join(f"{rate} Hz x {n}" for rate, n in sorted(report.rates.items()))
    out.print(f"{report.records} records, {report.seconds / 3600:.2f} h of audio; native rates: {rates or '-'}")
    for problem in report.problems:
        _echo(f"  {problem}")
    if report.problems:
        raise DataError(f"{manifest}: {len(report.problems)} problem(s) found (listed above)")
    out.print("no problems found")


@data_app.command("index")
def data_index(
    shards: Annotated[list[str], typer.Argument(help="WebDataset tar shards, or ranges such as 'train-{000000..000099}.tar' (paths or URLs).")],
) -> None:
    """Write each shard's index next to it (SHARD.index.json), so that training reads that instead of scanning the shard."""
    from audiorl.data.builders import index_shards

    done = index_shards(shards)
    for shard, index, samples in done:
        _echo(f"{shard}: {samples} samples -> {index}")
    _out().print(f"{len(done)} shard(s) indexed, {sum(n for _, _, n in done)} samples")


@app.command()
def quickstart(
    workdir: Annotated[Path, typer.Option(help="Where the model, speech, pairs, run and config go.")] = Path("audiorl-quickstart"),
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps of preference tuning (default: 40; 100 with --toy).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for speech, sampling and training.")] = 0,
    base: Annotated[Path | None, typer.Option(help="Start from this model folder instead of the imported Whisper tiny.en.")] = None,
    toy: Annotated[bool, typer.Option("--toy", help="The 2 M-parameter models/tiny-whisper-base of this repository and its settings.")] = False,
) -> None:
    """Import the real Whisper tiny.en, speak fresh sentences where it is worst (hard accents, fast,
    noisy), build N-best preference pairs from its own samples, tune it with MPO, and show WER
    before and after per test set (logged to the local MLflow store)."""
    from audiorl.quickstart import TEST_SETS, run

    config_path, outcome = run(workdir, max_steps=max_steps, seed=seed, base=base, toy=toy)
    out = _out()
    before, after = outcome.eval_before, outcome.result.eval_metrics
    last = outcome.result.last_metrics
    out.print("\n[bold]AudioRL quickstart done[/]")
    if before and after:
        for name in TEST_SETS:
            b, a = before[f"eval/{name}/wer"], after[f"eval/{name}/wer"]
            out.print(f"  {name} WER: {b:.3f} before -> {a:.3f} after ({(a - b) / b:+.0%} relative)" if b else
                      f"  {name} WER: {b:.3f} before -> {a:.3f} after")
    if "rewards/accuracies" in last:
        out.print(f"  reward accuracy (last logging window): {last['rewards/accuracies']:.2f}")
    out.print(f"  tuned model: {outcome.final_model_dir}")
    out.print(f"  run config:  {config_path}  (re-run with: audiorl train {config_path})")
    out.print(f"  {outcome.tracking}")
    if outcome.run_id:
        out.print("  WER chart:   eval/wer_before_after.png among the run's artifacts")


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    gate: Annotated[list[str], typer.Option("--gate", "-g", help="Gate test set: NAME=MANIFEST or MANIFEST (WER must improve); repeatable.")],
    check: Annotated[
        list[str] | None, typer.Option("--check", "-c", help="Other test set: must not regress beyond the tolerance; repeatable.")
    ] = None,
    margin: Annotated[float, typer.Option(help="Least relative WER improvement on every gate set (0.02 = 2%).")] = 0.0,
    tolerance: Annotated[float, typer.Option(help="Largest relative WER increase allowed on a check set.")] = 0.0,
    no_speech_tolerance: Annotated[float, typer.Option(
        help="On a set with clips without speech (empty references): the largest rise allowed in the share of them written on "
             "(0.05 = 5 points).")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Clips per prediction call.")] = 8,
    normalizer: NormalizerOption = "plain",
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns).")] = None,
    encoder_cache_dir: Annotated[Path | None, typer.Option(
        help="Encoder states kept by frozen-encoder runs (their model.encoder_cache_dir): versions with the same encoder weights "
             "read them instead of encoding the clips again.")] = None,
) -> None:
    """Promote NAME@challenger to NAME@champion if it beats the champion on the gate sets (and writes no more often on clips
    without speech)."""
    from rich.table import Table

    from audiorl.tracking.promotion import promote as run_promote

    decision = run_promote(name, _test_sets(gate), _test_sets(check or []), margin=margin, tolerance=tolerance,
                           no_speech_tolerance=no_speech_tolerance, tracking_uri=tracking_uri, batch_size=batch_size, log=_echo,
                           normalizer=_normalization(normalizer).normalizer, encoder_cache_dir=encoder_cache_dir)
    table = Table(title=f"{name}: champion v{decision.champion_version or '-'} vs challenger v{decision.challenger_version}")
    for column in ("test set", "measure", "role", "champion", "challenger", "change", "ok"):
        table.add_column(column)
    for row in decision.rows:
        table.add_row(row.test_set, row.measure, row.role, row.show(row.champion), row.show(row.challenger), row.change,
                      "yes" if row.passed else "NO")
    out = _out()
    out.print(table)
    verdict = "promoted" if decision.promote else "not promoted"
    out.print(f"{verdict}: {decision.reason}")


@model_app.command("export")
def model_export(
    source: Annotated[str, typer.Argument(
        help="A run's YAML file (with CHECKPOINT), a save_pretrained Whisper directory, or an MLflow model URI (models:/NAME@champion).")],
    checkpoint: Annotated[
        Path | None, typer.Argument(help="With a run's YAML: a checkpoint folder of that run (OUTPUT_DIR/checkpoints/checkpoint-N).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the model.")] = ...,
    format: Annotated[str | None, typer.Option(
        "--format",
        help="transformers (save_pretrained; the default for a checkpoint) or ctranslate2 (a faster-whisper model; the default otherwise).",
    )] = None,
    quantization: Annotated[str, typer.Option(help="With --format ctranslate2: float32, float16, int8, int8_float32, int8_float16, ...")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty --out.")] = False,
    set_: SetOption = None,
) -> None:
    """Export a model: a run's checkpoint as the run's final export would write it, and any saved
    Whisper (LoRA merged first) as a faster-whisper model."""
    from audiorl.api import export_model

    path = export_model(source, out, checkpoint=checkpoint, format=format, quantization=quantization, force=force, overrides=set_ or [])
    _echo(f"written: {path}")


@model_app.command("import")
def model_import(
    source: Annotated[Path, typer.Argument(help="A faster-whisper (CTranslate2) Whisper directory: model.bin, config.json, tokenizer.json.")],
    out: Annotated[Path, typer.Argument(help="Folder for the save_pretrained model.")],
    dtype: Annotated[str, typer.Option(help="Weights' type in the new model: float32, float16 or bfloat16.")] = "float32",
) -> None:
    """Turn a faster-whisper model into a save_pretrained Whisper that AudioRL, transformers and MLflow load."""
    from audiorl.api import import_model

    _echo(f"written: {import_model(source, out, dtype=dtype)}")


@model_app.command("init-whisper")
def model_init_whisper(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the new model (save_pretrained layout).")],
    texts: Annotated[list[Path], typer.Option("--texts", "-t", help="Manifest(s) whose transcripts train the tokenizer; repeatable.")],
    vocab_size: Annotated[int, typer.Option(help="Byte-level BPE vocabulary (special tokens come on top).")] = 1000,
    d_model: Annotated[int, typer.Option(help="Width.")] = 160,
    encoder_layers: Annotated[int, typer.Option(help="Encoder layers.")] = 3,
    decoder_layers: Annotated[int, typer.Option(help="Decoder layers.")] = 2,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    ffn_dim: Annotated[int, typer.Option(help="Feed-forward width.")] = 640,
    chunk_seconds: Annotated[int, typer.Option(help="Audio window in seconds (Whisper's is 30).")] = 5,
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
) -> None:
    """A new Whisper with random weights and its own tokenizer, to train from scratch."""
    from audiorl.data.records import read_records
    from audiorl.models.whisper import build_tiny_whisper

    corpus = [r.reference for path in texts for r in read_records(path, "transcript")]
    path = build_tiny_whisper(out, corpus, vocab_size=vocab_size, d_model=d_model, encoder_layers=encoder_layers,
                              decoder_layers=decoder_layers, attention_heads=heads, ffn_dim=ffn_dim, chunk_seconds=chunk_seconds, seed=seed)
    _echo(f"written: {path} ({len(corpus)} transcripts for the tokenizer)")


@tracking_app.command("sync")
def tracking_sync(
    output_dir: Annotated[Path, typer.Argument(help="The train.output_dir of a run that could not reach MLflow.")],
    tracking_uri: Annotated[str | None, typer.Option(help="Send here instead of the run's recorded tracking URI.")] = None,
) -> None:
    """Send what a training run kept while MLflow was unreachable."""
    from audiorl.tracking import sync

    run_id, sent = sync(output_dir, tracking_uri)
    _echo(f"run {run_id}: sent {sent} item(s); nothing left to send" if sent else f"run {run_id}: nothing to send")


# ---------------------------------------------------------------------------------------------
# Kubernetes: render, submit, follow. No torch on these paths.

KubeconfigOption = Annotated[str | None, typer.Option("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).")]
ContextOption = Annotated[str | None, typer.Option("--context", help="kubeconfig context (default: the current one).")]
NamespaceOption = Annotated[str, typer.Option("--namespace", "-n", help="Namespace of the job.")]
ApiOption = Annotated[str | None, typer.Option(
    "--api", help="pytorchjob (Kubeflow Training Operator v1) or trainjob (Kubeflow Trainer v2); default: the config's job.api.")]
FindApiOption = Annotated[str | None, typer.Option(
    "--api", help="pytorchjob or trainjob; default: whichever kind holds the job (both, for list).")]
RunIdOption = Annotated[str | None, typer.Option("--run-id", help="Run id for the labels (default: a new random one).")]
RuntimeOption = Annotated[str | None, typer.Option("--runtime", help="With a TrainJob: the training runtime (default: job.runtime).")]


def _err(message: str) -> None:
    _echo(message, err=True)


def _cluster(namespace: str, kubeconfig: str | None, context: str | None, api: str):
    from audiorl.k8s.client import Cluster, kind_of

    return Cluster(namespace, kubeconfig=kubeconfig, context=context, kind=kind_of(api))


def _job_cluster(job: str, namespace: str, kubeconfig: str | None, context: str | None, api: str | None):
    from audiorl.k8s.client import find_job

    return find_job(namespace, job, kubeconfig=kubeconfig, context=context, api=api)


@app.command()
def render(
    config: Annotated[Path, typer.Argument(help="YAML run file.")],
    set_: SetOption = None,
    api: ApiOption = None,
    runtime: RuntimeOption = None,
    run_id: RunIdOption = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the YAML here instead of printing it.")] = None,
) -> None:
    """Print the Kubernetes objects that run CONFIG on a cluster: a ConfigMap with the config and
    a PyTorchJob (or TrainJob). `kubectl apply -f` takes the output as it is."""
    from audiorl.k8s.render import render_file

    rendered = render_file(config, set_ or [], run_id=run_id, api=api, runtime=runtime)
    for note in rendered.warnings:
        _err(f"warning: {note}")
    if output:
        output.write_text(rendered.to_yaml())
        _err(f"written: {output} ({rendered.job['kind']} {rendered.namespace}/{rendered.name})")
    else:
        _echo(rendered.to_yaml().rstrip())


def _print_state(state) -> None:
    from datetime import datetime

    _echo(f"{datetime.now():%H:%M:%S} {state.summary()}")


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="YAML run file.")],
    set_: SetOption = None,
    api: ApiOption = None,
    runtime: RuntimeOption = None,
    run_id: RunIdOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the objects; create nothing.")] = False,
    server_dry_run: Annotated[
        bool, typer.Option("--server-dry-run", help="Send the objects with dryRun=All: the API server checks them, stores nothing.")
    ] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Delete a job of the same name that is still running, then submit.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Report status changes until the job succeeds or fails.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream the lead pod's log (master, or node 0), then wait for the outcome.")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait/--follow: give up after this many seconds.")] = None,
    local: Annotated[
        bool, typer.Option("--local", help="Run the job's pods here as local torchrun processes, with the operator's environment.")
    ] = False,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
) -> None:
    """Create the job on the cluster (or run it here with --local)."""
    from audiorl.k8s.render import render_file

    if dry_run:
        rendered = render_file(config, set_ or [], run_id=run_id, api=api, runtime=runtime)
        for note in rendered.warnings:
            _err(f"warning: {note}")
        _echo(rendered.to_yaml().rstrip())
        return
    from audiorl.k8s.submission import prepare

    rendered, _ = prepare(config, set_ or [], api=api, runtime=runtime, run_id=run_id, local=local,
                          create_run=not server_dry_run, log=_err)
    for note in rendered.warnings:
        _err(f"warning: {note}")
    backend = _backend(local, rendered.namespace, kubeconfig, context, rendered.api, timeout)
    try:
        backend.submit(rendered, replace=replace, server_dry_run=server_dry_run, log=_echo)
        if server_dry_run:
            return
        # a local job lives in this process: its output is shown and it is waited for
        if follow or backend.attached:
            for line in backend.logs(rendered.name, follow=True, wait_s=timeout or 600):
                _echo(line)
        if wait or follow or backend.attached:
            _finish(backend, rendered.name, timeout)
    finally:
        backend.close()


def _backend(local: bool, namespace: str, kubeconfig: str | None, context: str | None, api: str, timeout: float | None):
    """Where a job runs: the cluster, or (`--local`) this machine; both are driven the same way."""
    if local:
        from audiorl.k8s.local import LocalJobs

        return LocalJobs(timeout_s=timeout)
    return _cluster(namespace, kubeconfig, context, api)


def _finish(backend, name: str, timeout: float | None) -> None:
    from audiorl.errors import TrainingError

    state = backend.wait(name, timeout_s=timeout, on_change=_print_state)
    if state.phase != "Succeeded":
        failed = ", ".join(f"{n} {kind}" for kind, n in state.failed_replicas.items())
        raise TrainingError(f"job {name} {state.phase}: {state.message or state.reason}" + (f" (failed replicas: {failed})" if failed else ""))


@app.command()
def status(
    job: Annotated[str, typer.Argument(help="Job name.")],
    namespace: NamespaceOption = "default",
    wait: Annotated[bool, typer.Option("--wait", help="Report changes until the job succeeds or fails.")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait: give up after this many seconds.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the state as JSON.")] = False,
    api: FindApiOption = None,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
) -> None:
    """Where a job stands: its phase, conditions and replicas (failed ones named)."""
    from dataclasses import asdict

    cluster = _job_cluster(job, namespace, kubeconfig, context, api)
    if wait:
        _finish(cluster, job, timeout)
        return
    state = cluster.status(job)
    if as_json:
        _echo(json.dumps(asdict(state), indent=2))
        return
    _echo(state.summary())
    for cond in state.conditions:
        _echo(f"  {cond.get('lastTransitionTime', ''):20} {cond.get('type', ''):11} {cond.get('status', ''):5} {cond.get('reason', '')}")
    if state.failed_replicas:
        _echo("  failed replicas: " + ", ".join(f"{n} {kind}" for kind, n in state.failed_replicas.items()))


@app.command()
def logs(
    job: Annotated[str, typer.Argument(help="Job name.")],
    namespace: NamespaceOption = "default",
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the container ends.")] = False,
    api: FindApiOption = None,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
) -> None:
    """The lead pod's log: a PyTorchJob's master, a TrainJob's node 0."""
    for line in _job_cluster(job, namespace, kubeconfig, context, api).logs(job, follow=follow):
        _echo(line)


@app.command("list")
def list_jobs(
    namespace: NamespaceOption = "default",
    api: FindApiOption = None,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
) -> None:
    """The AudioRL jobs (PyTorchJobs and TrainJobs) in a namespace and their phases."""
    from audiorl.k8s.client import list_jobs

    states = list_jobs(namespace, kubeconfig=kubeconfig, context=context, api=api)
    if not states:
        _echo(f"no AudioRL jobs in namespace {namespace}")
    for state in states:
        _echo(f"{state.summary()}  ({state.kind})")


@app.command()
def delete(
    job: Annotated[str, typer.Argument(help="Job name.")],
    namespace: NamespaceOption = "default",
    api: FindApiOption = None,
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
) -> None:
    """Delete a job, its pods and its ConfigMap."""
    _job_cluster(job, namespace, kubeconfig, context, api).delete(job)
    _echo(f"deleted {job} in namespace {namespace}")


def main() -> None:
    from audiorl.errors import AudioRLError

    try:
        app()
    except AudioRLError as exc:
        if _state["debug"]:
            raise
        from audiorl.secrets import redact

        message = " ".join(redact(str(exc)).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
