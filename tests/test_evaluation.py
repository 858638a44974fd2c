import pytest

from audiorl.config import TextNormalization
from audiorl.scoring import pooled, score


def test_wer_counts_by_hand():
    # ref 1: 5 words, hyp drops one and substitutes one -> 1 D + 1 S
    # ref 2: 3 words, hyp adds one -> 1 I
    result = score(["Turn on the kitchen lights.", "call my sister"], ["turn the kitchen nights", "call my sister now"])
    assert (result.substitutions, result.deletions, result.insertions) == (1, 1, 1)
    assert result.wer == pytest.approx(3 / 8)
    assert result.sentence_error_rate == 1.0
    assert [u.errors for u in result.utterances] == [2, 1]
    assert result.utterances[0].wer == pytest.approx(2 / 5)


def test_normalisation_is_configurable():
    refs, hyps = ["Hello, World!"], ["hello world"]
    assert score(refs, hyps).wer == 0.0
    assert score(refs, hyps, TextNormalization(lowercase=False, remove_punctuation=True)).wer == pytest.approx(1.0)
    assert score(refs, hyps, TextNormalization(lowercase=True, remove_punctuation=False)).wer == pytest.approx(1.0)


def test_cer_and_empty_hypothesis():
    result = score(["abc"], [""])
    assert result.wer == 1.0 and result.deletions == 1
    assert result.cer == 1.0
    assert score(["abcd"], ["abed"]).cer == pytest.approx(0.25)


def test_non_latin_script():
    result = score(["привет мир"], ["привет мир"])
    assert result.wer == 0.0
    assert score(["你好世界"], ["你好世"]).cer == pytest.approx(0.25)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        score(["a", "b"], ["a"])


def test_clips_without_speech_count_their_words_as_insertions_and_report_an_output_rate():
    # 2 reference words in all; the first no-speech clip gets 2 invented words, the second none
    result = score(["call home", "", ""], ["call home", "thank you", ""])
    assert (result.substitutions, result.deletions, result.insertions) == (0, 0, 2)
    assert result.wer == pytest.approx(2 / 2)
    assert result.no_speech_clips == 2 and result.no_speech_output_rate == pytest.approx(0.5)
    assert result.metrics("eval/")["eval/no_speech_output_rate"] == pytest.approx(0.5)
    # a set with speech only reports no such rate
    speech_only = score(["call home"], ["call home"])
    assert speech_only.no_speech_output_rate is None and "no_speech_output_rate" not in speech_only.metrics()


def test_hotword_recall_counts_the_names_the_references_hold():
    refs = ["pay with novabank today", "open zentrix and kalora", "set a timer", "call vireo"]
    hyps = ["pay with nova bank today", "open Zentrix, and kalora", "set a timer", "call vireo now"]
    # the third clip lists a hotword its reference lacks: it expects nothing; the fourth has no column
    hotwords = [["novabank"], ["zentrix", "kalora"], ["orbita"], None]
    result = score(refs, hyps, hotwords=hotwords)
    assert (result.hotwords_expected, result.hotword_recall) == (3, pytest.approx(2 / 3))
    assert [(u.hotwords_expected, u.hotwords_found) for u in result.utterances] == [(1, 0), (2, 2), (0, 0), (0, 0)]
    assert result.metrics("eval/x/")["eval/x/hotword_recall"] == pytest.approx(2 / 3)
    # without hotword columns there is no recall to report, and no metric for it
    plain = score(refs, hyps)
    assert plain.hotword_recall is None and "hotword_recall" not in plain.metrics()
    # pooled over two sets: the hotwords as each set counted them
    both = pooled([score(refs[:2], hyps[:2], hotwords=hotwords[:2]), score(refs[2:], hyps[2:])])
    assert (both.hotwords_expected, both.hotword_recall) == (3, pytest.approx(2 / 3))
    with pytest.raises(ValueError, match="4 references but 1 hotword lists"):
        score(refs, hyps, hotwords=[["x"]])
