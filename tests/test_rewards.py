"""Each reward by hand, edge cases included (empty reference, empty hypothesis, non-Latin)."""

import pytest

from audiorl.rewards import build_reward, cer, hallucination, hotword, language, length, wer
from audiorl.rewards.asr import script_of


def test_wer_reward():
    # 1 substitution in 4 words -> 0.75; punctuation and case are normalised away
    assert wer(["Turn on the nights."], reference=["turn on the lights"]) == [pytest.approx(0.75)]
    assert wer(["a b c d e f g h"], reference=["a"]) == [0.0]  # 7 insertions: clipped at 0
    assert wer(["", "x"], reference=["", ""]) == [1.0, 0.0]  # empty reference: only silence is right
    assert wer([""], reference=["two words"]) == [0.0]
    assert wer(["a b", "a c"], reference="a b") == [1.0, 0.5]  # one reference for a group of completions


def test_cer_reward_non_latin():
    assert cer(["你好世"], reference=["你好世界"]) == [pytest.approx(0.75)]
    assert cer(["привет мир"], reference=["привет мир"]) == [1.0]


def test_hotword_recall_precision_f1():
    hws = [["AudioRL", "Kubeflow"]]
    ref = ["submit AudioRL jobs to Kubeflow"]
    assert hotword(["submit audiorl jobs to cube flow"], hotwords=hws, reference=ref) == [0.5]
    assert hotword(["submit audiorl jobs to kubeflow"], hotwords=hws, reference=ref) == [1.0]
    # precision: the hypothesis says a hotword the reference does not contain
    assert hotword(["audiorl audiorl kubeflow"], hotwords=hws, reference=ref, mode="precision") == [pytest.approx(2 / 3)]
    assert hotword(["audiorl"], hotwords=hws, reference=ref, mode="f1") == [pytest.approx(2 * 0.5 * 1.0 / 1.5)]
    assert hotword(["anything"], hotwords=[[]], reference=["x"]) == [None]  # no hotwords: not applicable
    assert hotword(["北京欢迎你"], hotwords=[["北京"]]) == [1.0]  # CJK: substring match
    assert hotword(["subkubeflow"], hotwords=[["kubeflow"]]) == [0.0]  # Latin: whole words only


def test_hallucination_penalty():
    ref = ["set a timer for ten minutes"]
    assert hallucination(["set a timer for ten minutes"], reference=ref) == [0.0]
    assert hallucination(["set a timer timer timer timer"], reference=ref) == [-1.0]  # loop
    assert hallucination(["thank you for watching thank you for watching thank you for watching thank you for watching"], reference=["hi"]) == [-1.0]
    long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen"
    assert hallucination([long], reference=ref) == [-1.0]  # > 2x + 4
    assert hallucination(["thank you"], reference=[""]) == [-1.0]  # output on a silent clip
    assert hallucination(["", "hello"], reference=["x", "y"], no_speech=[True, True]) == [0.0, -1.0]


def test_language_reward():
    assert language(["hello world"], language=["en"]) == [1.0]
    assert language(["你好世界"], language=["en"]) == [0.0]
    assert language(["你好世界"], language=["zh"]) == [1.0]
    assert language(["привет world"], language=["ru"]) == [0.0]  # 6 of 11 letters Cyrillic < 0.8
    assert language(["こんにちは世界"], language=["ja"]) == [1.0]  # kana and kanji
    assert language([""], language=["de"]) == [1.0]
    assert language(["abc"], language=[None]) == [None]
    assert script_of("7") is None and script_of("ж") == "CYRILLIC"


def test_length_reward():
    assert length(["a b c"], reference=["a b c"]) == [0.0]
    assert length(["a"], reference=["a b c d"]) == [pytest.approx(-0.75)]
    assert length(["a b c d e f g h i"], reference=["a b"]) == [-1.0]
    assert length(["x"], reference=[""]) == [-1.0]


def test_weighted_composition_skips_not_applicable():
    reward = build_reward([{"name": "wer", "weight": 1.0}, {"name": "hotword", "weight": 0.5}, {"name": "hallucination", "weight": 2.0}])
    total, parts = reward(
        ["turn on the lights", "turn turn turn turn on"],
        reference=["turn on the lights", "turn on the lights"],
        hotwords=[["lights"], []],
    )
    assert parts["hotword"] == [1.0, None]
    assert total[0] == pytest.approx(1.0 + 0.5 * 1.0 + 0.0)
    # second: WER = (1 sub? ) computed by jiwer; hotword not applicable; hallucination -1 x 2
    assert total[1] == pytest.approx(parts["wer"][1] - 2.0)


def test_custom_reward_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def shout(completions, **cols):\n    return [float(c.isupper()) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    total, parts = build_reward([{"name": "my_rewards:shout", "weight": 3.0}])(["HI", "hi"])
    assert total == [3.0, 0.0]


def test_composed_reward_scores_with_the_runs_normalizer():
    from audiorl.config import TextNormalization

    completions, refs = ["the train leaves at 730"], ["the train leaves at seven thirty"]
    plain, _ = build_reward([{"name": "wer"}])(completions, reference=refs)
    whisper, parts = build_reward([{"name": "wer"}], TextNormalization(normalizer="whisper_english"))(completions, reference=refs)
    assert plain[0] < 1.0
    assert whisper == [1.0] and parts["wer"] == [1.0]
