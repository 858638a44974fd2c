"""The champion/challenger gate: does a new registered version transcribe better than the one in
service, on the same test sets?

Both versions are scored on their registered weights (read back from MLflow, not a training-time
copy) with AudioRL's own decoder (`model_versions.load_version`): the one `audiorl eval` and the
training-time evaluation use, and the one whose transcripts match the CTranslate2 export's. (The
transformers pipeline pads a short clip's waveform to 30 s instead of its spectrogram, and writes
different words on some clips, enough to move a small test set's WER by more than a tolerance.)
Scores are kept on each version as tags (`audiorl.eval.<set>.wer`, with the test set's fingerprint), so a
version is evaluated once per test set, and running the gate twice decides the same way.

The rule: the challenger must lower WER on every gate set by at least `margin` (relative), and
may raise it on no other set by more than `tolerance` (relative). On every set, gate or check,
that holds clips without speech (an empty reference), it may also write on no larger a share of
those clips than the champion, give or take `no_speech_tolerance` (a share: 0.05 = 5 points):
a word written on silence is one insertion in a whole set's WER, so WER alone barely sees a model
that starts writing on every silent clip. With no champion yet, the challenger becomes champion.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from audiorl.audio import limits_for
from audiorl.config import TextNormalization, TrackingConfig
from audiorl.data.records import fingerprint, read_records
from audiorl.errors import AudioRLError
from audiorl.lazy import on_first_use
from audiorl.scoring import score
from audiorl.tracking import resolve_tracking_uri
from audiorl.tracking.model_versions import CHALLENGER, CHAMPION, load_version, using_tracking_uri

# the decoder (torch) is imported when a version has to be scored, not for the gate's arithmetic
evaluation: Any = on_first_use("audiorl.evaluation")

_WER_TAG = "audiorl.eval.{}.wer"
_CER_TAG = "audiorl.eval.{}.cer"
_DATA_TAG = "audiorl.eval.{}.data"
_NO_SPEECH_CLIPS_TAG = "audiorl.eval.{}.no_speech_clips"
_NO_SPEECH_TAG = "audiorl.eval.{}.no_speech_output_rate"
_DECODER = "+audiorl-decoder"


WER = "WER"
NO_SPEECH = "no-speech output"  # the share of a set's clips without speech that get any output


@dataclass
class SetScore:
    """One version on one test set."""

    wer: float
    no_speech_output_rate: float | None = None  # None: the set has no clip without speech


@dataclass
class Row:
    test_set: str
    role: str  # "gate" or "check"
    champion: float | None
    challenger: float
    passed: bool
    measure: str = WER

    @property
    def relative_change(self) -> float | None:
        if self.champion is None:
            return None
        if self.champion == 0:
            return 0.0 if self.challenger == 0 else float("inf")
        return (self.challenger - self.champion) / self.champion

    def show(self, value: float | None) -> str:
        """A value of this row's measure as the table prints it: WER to four places, a share of clips in percent."""
        if value is None:
            return "-"
        return f"{value:.1%}" if self.measure == NO_SPEECH else f"{value:.4f}"

    @property
    def change(self) -> str:
        """The change as the rule reads it: relative for WER, in points for a share of clips."""
        if self.champion is None:
            return "-"
        if self.measure == NO_SPEECH:
            return f"{100 * (self.challenger - self.champion):+.1f} points"
        return f"{self.relative_change:+.1%}"


@dataclass
class Decision:
    promote: bool
    reason: str
    rows: list[Row] = field(default_factory=list)
    challenger_version: str = ""
    champion_version: str | None = None
    changed: bool = False  # whether this call moved an alias


def decide(champion: Mapping[str, float] | None, challenger: Mapping[str, float], gate: list[str], *, margin: float,
           tolerance: float, champion_no_speech: Mapping[str, float] | None = None,
           challenger_no_speech: Mapping[str, float] | None = None, no_speech_tolerance: float = 0.0) -> Decision:
    """The gate's rule (pure: no MLflow) on WERs per test set, and on the share of clips without
    speech written on, per set that has such clips (`*_no_speech`: set -> share)."""
    rows = []
    for name in challenger:
        role = "gate" if name in gate else "check"
        old = None if champion is None else champion[name]
        new = challenger[name]
        if old is None:
            passed = True
        elif role == "gate":
            passed = new < old and new <= old * (1 - margin)
        else:
            passed = new <= old * (1 + tolerance) + 1e-12
        rows.append(Row(name, role, old, new, passed))
    for name, new in (challenger_no_speech or {}).items():
        old = None if champion is None else (champion_no_speech or {})[name]
        passed = old is None or new <= old + no_speech_tolerance + 1e-12
        rows.append(Row(name, "gate" if name in gate else "check", old, new, passed, NO_SPEECH))
    if champion is None:
        return Decision(True, "no champion yet: the first version becomes champion", rows)
    failed = [r for r in rows if not r.passed]
    if not failed:
        return Decision(True, f"WER lower by at least {margin:.1%} on every gate set, no other set worse by more than {tolerance:.1%}, "
                              f"no set's clips without speech written on more often (by more than {100 * no_speech_tolerance:.1f} points)", rows)
    parts = []
    for r in failed:
        if r.measure == NO_SPEECH:
            parts.append(f"{r.test_set}: writes on {r.challenger:.1%} of the clips without speech where the champion wrote on "
                         f"{r.champion:.1%} ({r.change}), more than the +{100 * no_speech_tolerance:.1f} points allowed")
        elif r.role == "gate":
            parts.append(f"{r.test_set}: {r.champion:.4f} -> {r.challenger:.4f} ({r.change}), needs at least -{margin:.1%}")
        else:
            parts.append(f"{r.test_set}: {r.champion:.4f} -> {r.challenger:.4f} ({r.change}), more than the +{tolerance:.1%} allowed")
    return Decision(False, "; ".join(parts), rows)


def score_version(client, name: str, version: str, sets: Mapping[str, str | Path], *, batch_size: int = 8, log=print,
                  normalizer: str = "plain", encoder_cache_dir: str | Path | None = None) -> dict[str, SetScore]:
    """WER (and the share of clips without speech written on) of one registered version on each
    test set: from its tags when they were measured on the same data, normaliser and decoder, else
    by transcribing with the version's weights (and saved as tags). With `encoder_cache_dir`, the
    encoder states of clips already encoded by the same encoder weights are read from there."""
    tags = client.get_model_version(name, version).tags
    scores: dict[str, SetScore] = {}
    loaded = None
    with tempfile.TemporaryDirectory(prefix="audiorl-promote-") as workdir:  # the version's weights, while they are used
        for set_name, path in sets.items():
            records = read_records(path, "transcript")
            # keyed by the decoder too: a score stored when promote decoded through the pipeline is not reused
            data_fp = (fingerprint(records) if normalizer == "plain" else f"{fingerprint(records)}+{normalizer}") + _DECODER
            # (a version scored before the no-speech count was kept is scored again)
            if tags.get(_DATA_TAG.format(set_name)) == data_fp and _NO_SPEECH_CLIPS_TAG.format(set_name) in tags:
                rate = tags.get(_NO_SPEECH_TAG.format(set_name))
                scores[set_name] = SetScore(float(tags[_WER_TAG.format(set_name)]), None if rate is None else float(rate))
                continue
            if loaded is None:
                log(f"loading {name} version {version}")
                # models:/ resolves through the process-wide registry: point it at this client's server
                with using_tracking_uri(client.tracking_uri):
                    loaded = load_version(f"models:/{name}/{version}", workdir, encoder_cache_dir=encoder_cache_dir)
            adapter, max_new_tokens = loaded
            # no length limit of its own, but a clip over the model's input window is refused, not cut off
            limits = limits_for(adapter.sampling_rate, float("inf"), adapter.window_seconds)
            hypotheses = evaluation.transcribe(adapter, records, limits, batch_size=batch_size, max_new_tokens=max_new_tokens)
            result = score([r.reference for r in records], hypotheses, TextNormalization(normalizer=normalizer),
                           sources=[r.source for r in records])
            silent = "" if result.no_speech_output_rate is None else \
                f", wrote on {result.no_speech_output_rate:.1%} of {result.no_speech_clips} clips without speech"
            log(f"{name} v{version} on {set_name}: WER {result.wer:.4f} ({result.num_utterances} utterances{silent})")
            stored = [(_WER_TAG, result.wer), (_CER_TAG, result.cer), (_NO_SPEECH_CLIPS_TAG, result.no_speech_clips)]
            if result.no_speech_output_rate is not None:
                stored.append((_NO_SPEECH_TAG, result.no_speech_output_rate))
            for tag, value in [*stored, (_DATA_TAG, data_fp)]:  # the fingerprint last: it vouches for the others
                client.set_model_version_tag(name, version, tag.format(set_name), str(value))
            scores[set_name] = SetScore(result.wer, result.no_speech_output_rate)
    return scores


def _version_by_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _decide(old: dict[str, SetScore] | None, new: dict[str, SetScore], gate: list[str], **rule) -> Decision:
    def no_speech(scores):
        return {k: v.no_speech_output_rate for k, v in scores.items() if v.no_speech_output_rate is not None}

    return decide(None if old is None else {k: v.wer for k, v in old.items()}, {k: v.wer for k, v in new.items()}, gate,
                  champion_no_speech=None if old is None else no_speech(old), challenger_no_speech=no_speech(new), **rule)


def promote(name: str, gate: Mapping[str, str | Path], checks: Mapping[str, str | Path] | None = None, *, margin: float = 0.0,
            tolerance: float = 0.0, no_speech_tolerance: float = 0.0, tracking_uri: str | None = None, batch_size: int = 8,
            log=print, normalizer: str = "plain", encoder_cache_dir: str | Path | None = None) -> Decision:
    """Compare the `challenger` version of `name` with its `champion` on the gate (and check) sets,
    move `champion` if the challenger wins, and record the decision on the challenger's tags.
    `encoder_cache_dir`: a folder of encoder states (a frozen-encoder run's `model.encoder_cache_dir`)
    to read them from instead of encoding the clips again."""
    from mlflow.tracking import MlflowClient

    if not gate:
        raise AudioRLError("promote needs at least one gate test set (--gate NAME=MANIFEST)")
    overlap = set(gate) & set(checks or {})
    if overlap:
        raise AudioRLError(f"test sets {sorted(overlap)} are named both as gate and as check sets")
    client = MlflowClient(tracking_uri or resolve_tracking_uri(TrackingConfig()))
    challenger = _version_by_alias(client, name, CHALLENGER)
    if challenger is None:
        raise AudioRLError(f"registered model {name!r} has no version with the alias {CHALLENGER!r} (training registers one)")
    champion = _version_by_alias(client, name, CHAMPION)
    sets = {**gate, **(checks or {})}
    rule = {"margin": margin, "tolerance": tolerance, "no_speech_tolerance": no_speech_tolerance}

    def scores(version: str) -> dict[str, SetScore]:
        return score_version(client, name, version, sets, batch_size=batch_size, log=log, normalizer=normalizer,
                             encoder_cache_dir=encoder_cache_dir)

    if champion is not None and champion.version == challenger.version:
        decision = _decide(None, scores(challenger.version), list(gate), **rule)
        return Decision(False, f"version {challenger.version} is already the champion", decision.rows, challenger.version, champion.version)
    new = scores(challenger.version)
    old = scores(champion.version) if champion else None
    decision = _decide(old, new, list(gate), **rule)
    decision.challenger_version = challenger.version
    decision.champion_version = champion.version if champion else None
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    record = {
        "audiorl.promotion.decision": "promoted" if decision.promote else "rejected",
        "audiorl.promotion.reason": decision.reason[:5000],
        "audiorl.promotion.compared_with": decision.champion_version or "none",
        "audiorl.promotion.gate_sets": ",".join(gate),
        "audiorl.promotion.margin": str(margin),
        "audiorl.promotion.tolerance": str(tolerance),
        "audiorl.promotion.no_speech_tolerance": str(no_speech_tolerance),
        "audiorl.promotion.decided_at": stamp,
    }
    for key, value in record.items():
        client.set_model_version_tag(name, challenger.version, key, value)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
        if champion is not None:
            client.set_model_version_tag(name, champion.version, "audiorl.promotion.replaced_by", challenger.version)
        decision.changed = True
    return decision
