import pytest
import torch

from audiorl.audio import AudioLimits
from audiorl.config import LoraSettings, ModelConfig
from audiorl.data.collate import PreferenceCollator, RecordDataset
from audiorl.data.records import read_records
from audiorl.errors import ModelError
from audiorl.methods.dpo import DPOConfig, PreferenceStep
from audiorl.models.registry import load_adapter
from audiorl.reference import FrozenReference


def _batch(adapter, speech_dir, n=4):
    records = read_records(speech_dir / "pairs.jsonl", "preference")[:n]
    dataset = RecordDataset(records, AudioLimits(sampling_rate=adapter.sampling_rate, max_seconds=5))
    return PreferenceCollator(adapter)([dataset[i] for i in range(n)])


def test_summed_logp_equals_minus_labels_cross_entropy(adapter, speech_dir):
    """The adapter's log-prob of a transcript is minus the token cross-entropy that Whisper's own
    `labels` loss gives for the same tokens, with the prefix tokens excluded."""
    batch = _batch(adapter, speech_dir)
    context = adapter.encode(batch["features"])
    scored = adapter.sequence_logps(context, batch["chosen_ids"])
    prefix = adapter.prefix_ids
    for row, target in enumerate(batch["chosen_ids"]):
        decoder_input = torch.tensor([prefix + target[:-1]])
        labels = torch.tensor([[-100] * (len(prefix) - 1) + target])
        out = adapter.model(input_features=batch["features"]["input_features"][row : row + 1], decoder_input_ids=decoder_input, labels=labels)
        expected = -out.loss * len(target)
        torch.testing.assert_close(scored.sum[row], expected, rtol=1e-5, atol=1e-4)
        assert int(scored.num_tokens[row]) == len(target)  # transcript + end-of-text, no prefix


def test_prefix_is_whisper_start_language_task_notimestamps(adapter):
    tok = adapter.tokenizer
    assert tok.convert_ids_to_tokens(adapter.prefix_ids) == [
        "<|startoftranscript|>",
        "<|en|>",
        "<|transcribe|>",
        "<|notimestamps|>",
    ]
    ids = adapter.target_ids(["hello there"])[0]
    assert ids[-1] == adapter.eos_id and not set(ids[:-1]) & set(adapter.prefix_ids)


def test_unsupported_language_is_a_clear_error(tiny_whisper):
    with pytest.raises(ModelError, match="model.language='klingon'"):
        load_adapter(ModelConfig(name_or_path=str(tiny_whisper), language="klingon"))


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match=r"nothing: model folder not found \(it names a local folder\)"):
        load_adapter(ModelConfig(name_or_path=str(tmp_path / "nothing")))


def _count_encoder_calls(adapter, module=None):
    """The clips each encoder call encoded (on a CPU the encoder takes one clip per call)."""
    calls = []
    core = (module or adapter.model).model.encoder
    handle = core.register_forward_hook(lambda m, i, o: calls.append(o.last_hidden_state.shape[0]))
    return calls, handle


def test_encoder_runs_once_per_clip_for_policy_and_reference(adapter, speech_dir):
    batch = _batch(adapter, speech_dir, n=3)
    reference = FrozenReference(adapter)
    step = PreferenceStep(adapter, DPOConfig(), reference)
    policy_calls, h1 = _count_encoder_calls(adapter)
    ref_calls, h2 = _count_encoder_calls(adapter, reference.module)
    try:
        step(batch)
    finally:
        h1.remove(), h2.remove()
    # three clips encoded, not six (chosen + rejected), for the policy and for the reference
    assert sum(policy_calls) == 3 and sum(ref_calls) == 3


def test_frozen_encoder_shares_one_encoder_pass(model_config, speech_dir):
    adapter = load_adapter(model_config.model_copy(update={"freeze_encoder": True}))
    assert not adapter.encoder_trainable
    batch = _batch(adapter, speech_dir, n=2)
    reference = FrozenReference(adapter)
    step = PreferenceStep(adapter, DPOConfig(), reference)
    policy_calls, h1 = _count_encoder_calls(adapter)
    ref_calls, h2 = _count_encoder_calls(adapter, reference.module)
    try:
        out = step(batch)
    finally:
        h1.remove(), h2.remove()
    assert sum(policy_calls) == 2 and sum(ref_calls) == 0
    out.loss.backward()
    assert all(p.grad is None for p in adapter.model.model.encoder.parameters())
    assert adapter.model.model.decoder.layers[0].fc1.weight.grad is not None


def test_shared_encoder_equals_naive_full_model(adapter, speech_dir):
    """Encoding once and indexing gives the same log-probs as running the whole model per target."""
    batch = _batch(adapter, speech_dir, n=3)
    n = 3
    targets = batch["chosen_ids"] + batch["rejected_ids"]
    index = torch.arange(n).repeat(2)
    shared = adapter.sequence_logps(adapter.encode(batch["features"]), targets, index).sum
    feats = {"input_features": batch["features"]["input_features"][index]}
    naive = adapter.sequence_logps(adapter.encode(feats), targets).sum
    torch.testing.assert_close(shared, naive, rtol=1e-5, atol=1e-5)


def test_save_and_reload_round_trip(adapter, speech_dir, tmp_path):
    batch = _batch(adapter, speech_dir, n=2)
    with torch.no_grad():
        before = adapter.generate(adapter.encode(batch["features"]), max_new_tokens=8)
    adapter.save_pretrained(str(tmp_path / "saved"))
    again = load_adapter(adapter.config.model_copy(update={"name_or_path": str(tmp_path / "saved")}))
    with torch.no_grad():
        after = again.generate(again.encode(batch["features"]), max_new_tokens=8)
    assert before.token_ids == after.token_ids
    gen = again.model.generation_config
    assert gen.lang_to_id["<|en|>"] == adapter.prefix_ids[1]  # Whisper's fields survive the reload
    assert gen.no_timestamps_token_id == adapter.prefix_ids[3]


def test_sampling_returns_n_sequences_per_clip(adapter, speech_dir):
    batch = _batch(adapter, speech_dir, n=2)
    g = torch.Generator().manual_seed(0)
    out = adapter.generate(adapter.encode(batch["features"]), max_new_tokens=6, do_sample=True, num_return_sequences=3, top_k=20, generator=g)
    assert len(out.token_ids) == 6 and len(out.texts) == 6
    assert all(len(ids) <= 6 for ids in out.token_ids)
    suppressed = adapter._suppress
    assert not any(t in suppressed for ids in out.token_ids for t in ids)


def test_lora_reference_is_the_base_model(model_config, speech_dir):
    """With LoRA on, disabling the adapter gives exactly the base model's log-probs."""
    base = load_adapter(model_config)
    lora = load_adapter(model_config.model_copy(update={"lora": LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "fc1"])}))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # a trained-looking adapter, so enabled != disabled
    assert lora.uses_lora and lora.encoder_trainable
    trainable = {n for n, p in lora.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    batch = _batch(base, speech_dir, n=2)
    targets = batch["chosen_ids"]
    with torch.no_grad():
        expected = base.sequence_logps(base.encode(batch["features"]), targets).sum
        enabled = lora.sequence_logps(lora.encode(batch["features"]), targets).sum
        from audiorl.reference import AdapterDisabledReference

        ref = AdapterDisabledReference(lora).logps(batch, lora.encode(batch["features"]), targets, torch.arange(2))
    torch.testing.assert_close(ref, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(enabled, expected, atol=1e-3)
    # the adapter trains again once the reference pass is over
    assert {n for n, p in lora.model.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize("layout", ["group", "pairs", "uneven"])
def test_targets_that_share_a_clip_score_as_if_each_had_its_own_copy(adapter, speech_dir, layout):
    """Several targets per clip (GRPO's group, DPO's chosen and rejected) read the clip's
    cross-attention keys and values projected once; log-probs and gradients must be those of
    scoring each target against its own copy of the encoder states."""
    batch = _batch(adapter, speech_dir)
    adapter.model.train()
    texts = batch["chosen_ids"] + batch["rejected_ids"]
    index = {"group": torch.arange(4).repeat_interleave(2), "pairs": torch.arange(4).repeat(2),
             "uneven": torch.tensor([0, 0, 0, 1, 2, 2, 3, 3])}[layout]
    targets = [texts[i] for i in range(8)]

    def scored(shared):
        adapter.model.zero_grad()
        context = adapter.encode(batch["features"])
        out = adapter.sequence_logps(context, targets, index) if shared else adapter.sequence_logps(context.select(index), targets)
        (out.token_logps * torch.linspace(0.5, 1.5, 8).unsqueeze(-1)).sum().backward()  # rows weighed apart: order matters
        grads = {name: p.grad.clone() for name, p in adapter.model.named_parameters() if p.grad is not None}
        return out, grads

    (ours, ours_grads), (naive, naive_grads) = scored(True), scored(False)
    assert torch.allclose(ours.token_logps, naive.token_logps, atol=1e-5) and torch.equal(ours.mask, naive.mask)
    assert ours_grads.keys() == naive_grads.keys()
    for name, grad in naive_grads.items():
        assert torch.allclose(ours_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_token_entropy_and_sum_of_squared_probabilities_follow_the_scored_rows(adapter, speech_dir):
    """What token-weighing losses read (GRPO's entropy mask, WPO's weights) belongs to the row it
    is reported for, also when the rows were scored in another order (shared cross-attention)."""
    batch = _batch(adapter, speech_dir)
    context = adapter.encode(batch["features"])
    targets = batch["chosen_ids"] + batch["rejected_ids"]
    index = torch.arange(4).repeat(2)
    together = adapter.sequence_logps(context, targets, index)
    for row in (0, 5):
        alone = adapter.sequence_logps(context.select(index[row : row + 1]), targets[row : row + 1])
        n = int(alone.mask.sum())
        logits_logps = alone.vocab_logps[0, :n]
        by_hand_entropy = -(logits_logps.exp() * logits_logps).sum(-1)
        by_hand_sq = torch.log((logits_logps.exp() ** 2).sum(-1))
        assert torch.allclose(together.entropy()[row, :n], by_hand_entropy, atol=1e-4)
        assert torch.allclose(together.log_sum_sq_probs()[row, :n], by_hand_sq, atol=1e-4)
        assert float(together.entropy()[row, n:].abs().sum()) == 0.0
