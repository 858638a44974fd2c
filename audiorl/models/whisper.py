"""Whisper (encoder-decoder) behind the adapter contract.

The decoder is conditioned on Whisper's prefix (start of transcript, language, task,
no-timestamps); those tokens are never scored. A completion is ` <transcript><|endoftext|>`, with
the leading space Whisper's own transcripts carry. The encoder runs once per clip: `encode` returns
its hidden states, and `sequence_logps` indexes them for every target scored against that clip.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.whisper.modeling_whisper import eager_attention_forward
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from audiorl.config import ModelConfig
from audiorl.errors import ModelError
from audiorl.models.base import (
    AudioContext,
    Generation,
    ModelAdapter,
    SequenceLogps,
    apply_trainable_settings,
    load_pretrained,
    score_tokens,
    weights_digest,
)
from audiorl.models.encoder_cache import EncoderCache
from audiorl.models.sampling import next_tokens
from audiorl.models.tiny import train_byte_bpe

# the attention implementation a decoder call runs with while the cross-attention is shared
# (see _shared_cross_attention): a stack, so that a nested call restores what it found
_INNER_ATTENTION: list[str] = []


def _grouped_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention for a decoder whose cross-attention keys and values hold one row per clip while
    its queries hold `group` targets per clip (sorted by clip): each clip's targets are read as one
    longer query, which is the same attention (cross-attention has no mask and no positions), with
    no copy of the keys and values per target. Self-attention runs as the model's own implementation."""
    name = _INNER_ATTENTION[-1]
    inner = eager_attention_forward if name == "eager" else ALL_ATTENTION_FUNCTIONS[name]
    clips = key.shape[0]
    if clips == query.shape[0]:
        return inner(module, query, key, value, attention_mask, **kwargs)
    batch, heads, length, width = query.shape
    group = batch // clips
    grouped = query.view(clips, group, heads, length, width).transpose(1, 2).reshape(clips, heads, group * length, width)
    out, _ = inner(module, grouped, key, value, None, **kwargs)  # (clips, group * length, heads, width)
    return out.reshape(batch, length, heads, width), None


AttentionInterface.register("audiorl_grouped_cross_attention", _grouped_attention)


@contextmanager
def _grouped_cross_attention(core: nn.Module, on: bool = True):
    """While open (and `on`), the decoder runs `_grouped_attention`: its cross-attention keys and
    values hold one row per clip, its queries several targets per clip."""
    if not on:
        yield
        return
    _INNER_ATTENTION.append(core.config._attn_implementation)
    core.config._attn_implementation = "audiorl_grouped_cross_attention"
    try:
        yield
    finally:
        core.config._attn_implementation = _INNER_ATTENTION.pop()


def _shared_cross_attention(core: nn.Module, hidden: torch.Tensor, clips: torch.Tensor) -> EncoderDecoderCache | None:
    """The decoder's cross-attention keys and values, projected once per clip (`clips`: the rows of
    `hidden` in the order the targets read them) for every target that reads the clip (GRPO's
    group, DPO's chosen and rejected), as a cache the decoder reads instead of projecting each
    target's copy of the encoder states: on a 30-second window those projections are most of the
    decoder's work. None where a layer cannot be called on its own (FSDP-sharded weights) or the
    cache would be dropped (activation checkpointing); the decoder then projects repeated states."""
    layers = core.model.decoder.layers
    if getattr(core, "is_activation_checkpointing", False) or hasattr(layers[0].encoder_attn.k_proj.weight, "full_tensor"):
        return None
    hidden = hidden.index_select(0, clips.to(hidden.device))
    cross = DynamicCache()
    for number, layer in enumerate(layers):
        attention = layer.encoder_attn
        shape = (hidden.shape[0], -1, attention.num_heads, attention.head_dim)
        cross.update(attention.k_proj(hidden).view(shape).transpose(1, 2), attention.v_proj(hidden).view(shape).transpose(1, 2), number)
    cache = EncoderDecoderCache(DynamicCache(), cross)
    for number in range(len(layers)):
        cache.is_updated[number] = True
    return cache


def _clip_groups(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the order that sorts targets by clip, the clips in that order, once each) when every clip
    is read by the same number (> 1) of targets; None otherwise."""
    clips, counts = torch.unique(index, return_counts=True)
    if len(clips) == len(index) or bool((counts != counts[0]).any()):
        return None
    return torch.argsort(index, stable=True), clips


class WhisperContext(AudioContext):
    def __init__(self, hidden_states: torch.Tensor):
        self.hidden_states = hidden_states  # (B, T, D)

    def select(self, index: torch.Tensor) -> WhisperContext:
        return WhisperContext(self.hidden_states.index_select(0, index.to(self.hidden_states.device)))

    @property
    def batch_size(self) -> int:
        return self.hidden_states.shape[0]

    def row(self, index: int) -> torch.Tensor:
        return self.hidden_states[index]

    @classmethod
    def from_rows(cls, rows: list[torch.Tensor], device: torch.device) -> WhisperContext:
        return cls(torch.stack([r.to(device) for r in rows]))


def _core(model: nn.Module) -> nn.Module:
    """The WhisperForConditionalGeneration inside a possible peft wrapper (LoRA layers are injected
    in place, so calling the core still uses them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


CTC_HEAD = "audiorl_ctc_head"

# How a clip shorter than the window is padded, kept in the feature extractor's saved config.
# Absent (real checkpoints): Whisper's own layout, the clip's log-mel spectrogram followed by zeros,
# as openai-whisper's transcribe() and faster-whisper compute it. "waveform": the waveform is padded
# with silence before the spectrogram (transformers' feature extractor), which the models AudioRL
# built before it read real checkpoints were trained on.
PADDING = "audiorl_padding"


def _has_dropout(config) -> bool:
    return any(getattr(config, name, 0.0) for name in ("dropout", "attention_dropout", "activation_dropout"))


def multilingual_vocabulary(vocab_size: int) -> bool:
    """Whisper's own rule: a multilingual vocabulary has 51865 entries or more, English-only 51864."""
    return vocab_size >= 51865


def _is_multilingual(generation, vocab_size: int) -> bool:
    """What the checkpoint's generation config says; Whisper's own rule where it says nothing."""
    flag = getattr(generation, "is_multilingual", None)
    return bool(flag) if flag is not None else multilingual_vocabulary(vocab_size)


class WhisperAdapter(ModelAdapter):
    family = "whisper"
    mlflow_flavor = "transformers"

    def __init__(self, model: nn.Module, processor, config: ModelConfig):
        super().__init__(model, config)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.feature_extractor = processor.feature_extractor
        generation = _core(model).generation_config
        self.multilingual = _is_multilingual(generation, _core(model).config.vocab_size)
        language, task = config.language, config.task
        if not self.multilingual:
            # An English-only checkpoint was trained on <|startoftranscript|><|notimestamps|>:
            # with language and task tokens inserted it ends every transcript at once.
            if (language or "en").lower() not in ("en", "english"):
                raise ModelError(f"model.language={language!r}: {config.name_or_path} is an English-only Whisper; "
                                 "use a multilingual checkpoint for other languages")
            if task == "translate":
                raise ModelError(f"model.task='translate': {config.name_or_path} is an English-only Whisper and cannot translate")
            language, task = None, None
        try:
            self.tokenizer.set_prefix_tokens(language=language, task=task, predict_timestamps=False)
        except ValueError as exc:
            raise ModelError(f"model.language={config.language!r}: {exc}") from None
        self.prefix_ids: list[int] = list(self.tokenizer.prefix_tokens)
        self.eos_id: int = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else self.eos_id
        self._suppress = self._suppressed_ids()
        # the checkpoint's max_length counts the prompt, as transformers' generate counts it (only
        # when the checkpoint sets it: GenerationConfig's own default of 20 would cut transcripts)
        max_length = generation.to_diff_dict().get("max_length")
        self._max_new_tokens = min(self.max_target_tokens, max_length - len(self.prefix_ids)) if max_length else self.max_target_tokens
        # the checkpoint's own begin-suppressed tokens (a blank, end-of-text) on the first step
        vocab = _core(model).config.vocab_size
        self._begin_suppress = sorted(int(t) for t in (getattr(generation, "begin_suppress_tokens", None) or []) if 0 <= int(t) < vocab)

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, config: ModelConfig, device: torch.device | str = "cpu") -> WhisperAdapter:
        model, processor = load_pretrained(WhisperForConditionalGeneration, config, "Whisper", WhisperProcessor.from_pretrained)
        model.to(device)
        model = apply_trainable_settings(model, config, model.model.encoder, projector=None)
        adapter = cls(model, processor, config)
        if config.freeze_encoder and config.encoder_cache:
            adapter.enable_encoder_cache(config.encoder_cache_dir, int(config.encoder_cache_max_gb * 2**30))
        return adapter

    def enable_encoder_cache(self, directory: str | None = None, max_bytes: int = 4 * 2**30) -> None:
        """Reuse each clip's encoder states while the encoder does not train (see encoder_cache.py).

        Keyed by the encoder's own weights: a model tuned with its encoder frozen (a table run's
        output, a registered version) finds the states its starting model left."""
        key = f"{self.family}:{weights_digest(_core(self.model).model.encoder)}"
        self.encoder_cache = EncoderCache(key, WhisperContext, max_bytes=max_bytes, directory=directory)


    def save_pretrained(self, directory: str, state_dict: dict | None = None) -> None:
        """The training-only CTC head never leaves training: the export is a plain Whisper."""
        core = _core(self.model)
        head = core._modules.pop(CTC_HEAD, None)
        if state_dict is not None:
            state_dict = {k: v for k, v in state_dict.items() if CTC_HEAD not in k}
        try:
            super().save_pretrained(directory, state_dict=state_dict)
        finally:
            if head is not None:
                core.add_module(CTC_HEAD, head)

    # -- data --------------------------------------------------------------------------------

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    @property
    def max_target_tokens(self) -> int:
        return int(_core(self.model).config.max_target_positions) - len(self.prefix_ids) + 1

    @property
    def window_seconds(self) -> float:
        """Whisper hears a fixed window (30 s for OpenAI's models): the rest of a clip is cut off."""
        return self.feature_extractor.n_samples / self.sampling_rate

    def features(self, waveforms: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Log-mel features in the layout the checkpoint was trained on (see `PADDING`)."""
        fe = self.feature_extractor
        if getattr(fe, PADDING, None) == "waveform":
            out = fe(waveforms, sampling_rate=self.sampling_rate, return_tensors="pt", padding="max_length")
            return {"input_features": out["input_features"]}
        frames = fe.nb_max_frames
        batch = np.zeros((len(waveforms), fe.feature_size, frames), dtype=np.float32)
        for row, wave in enumerate(waveforms):
            # as Whisper's transcribe() and faster-whisper do: the clip's own spectrogram (one hop
            # of zeros after it, its last frame dropped), then zeros up to the window
            mel = fe(np.pad(wave, (0, fe.hop_length)), sampling_rate=self.sampling_rate, return_tensors="np",
                     padding="longest")["input_features"][0][:, :-1]
            n = min(mel.shape[1], frames)
            batch[row, :, :n] = mel[:, :n]
        return {"input_features": torch.from_numpy(batch)}

    def target_ids(self, texts: list[str]) -> list[list[int]]:
        encoded = self.tokenizer([" " + text.strip() for text in texts], add_special_tokens=False)
        return [ids + [self.eos_id] for ids in encoded["input_ids"]]

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.eos_id]

    def decode(self, token_ids: list[list[int]]) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    # -- compute -----------------------------------------------------------------------------

    def encode(self, features: dict[str, torch.Tensor], model: nn.Module | None = None) -> WhisperContext:
        core = _core(model if model is not None else self.model)

        def compute(batch: dict[str, torch.Tensor]) -> WhisperContext:
            feats = batch["input_features"].to(self.device, dtype=core.dtype)
            if feats.device.type != "cpu":
                return WhisperContext(core.model.encoder(input_features=feats).last_hidden_state)
            # On a CPU the encoder runs faster one clip at a time (tiny.en: 16 clips in 5.8 s
            # against 7.4 s as one batch; a 16-clip batch's activations outgrow the caches); the
            # decoder still runs the whole batch together.
            return WhisperContext(torch.cat([core.model.encoder(input_features=f).last_hidden_state for f in feats.split(1)]))

        # a frozen encoder without active dropout gives a clip the same states every time (the
        # reference's frozen copy has the same encoder weights)
        encoder = core.model.encoder
        if self.encoder_cache is not None and not self.encoder_trainable and not (encoder.training and _has_dropout(core.config)):
            return self.encoder_cache.encode(features, compute, self.device)  # type: ignore[return-value]
        return compute(features)

    def sequence_logps(
        self,
        context: AudioContext,
        targets: list[list[int]],
        index: torch.Tensor | None = None,
        model: nn.Module | None = None,
    ) -> SequenceLogps:
        core = _core(model if model is not None else self.model)
        assert isinstance(context, WhisperContext)
        encoded = context.hidden_states
        groups = _clip_groups(index.cpu()) if index is not None else None
        if groups is not None:
            # the targets sorted by clip, so that a clip's targets sit together for the shared
            # cross-attention; their rows are put back in the caller's order at the end
            order = groups[0]
            targets, index = [targets[i] for i in order.tolist()], index.cpu()[order]
        if index is not None:
            context = context.select(index)
        if context.batch_size != len(targets):
            raise ValueError(f"{len(targets)} targets for {context.batch_size} context rows")
        device = context.hidden_states.device
        n_prefix = len(self.prefix_ids)
        longest = max(len(t) for t in targets)
        if longest > self.max_target_tokens:
            raise ValueError(f"a target has {longest} tokens; this model scores at most {self.max_target_tokens}")
        # decoder input: prefix + target[:-1]; output position n_prefix-1+j predicts target[j]
        inputs = torch.full((len(targets), n_prefix + longest - 1), self.pad_id, dtype=torch.long)
        labels = torch.full((len(targets), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(targets), longest), dtype=torch.float32)
        inputs[:, :n_prefix] = torch.tensor(self.prefix_ids)
        for row, ids in enumerate(targets):
            inputs[row, n_prefix : n_prefix + len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
            labels[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1.0
        inputs, labels, mask = inputs.to(device), labels.to(device), mask.to(device)
        cross = _shared_cross_attention(core, encoded, groups[1]) if groups is not None else None
        if cross is None:
            hidden = core.model.decoder(input_ids=inputs, encoder_hidden_states=context.hidden_states, use_cache=False).last_hidden_state
        else:
            with _grouped_cross_attention(core):
                hidden = core.model.decoder(input_ids=inputs, encoder_hidden_states=context.hidden_states, cache=cross,
                                            use_cache=True).last_hidden_state
        scored = score_tokens(core.proj_out(hidden[:, n_prefix - 1 :]), labels, mask)
        if groups is not None:
            back = torch.argsort(groups[0]).to(mask.device)
            scored = SequenceLogps(scored.token_logps.index_select(0, back), scored.mask.index_select(0, back), scored.vocab_logps, back)
        return scored

    def add_ctc_head(self) -> None:
        """A linear layer from the encoder's output to the vocabulary plus a blank. Trained with
        the model (it is a submodule, so it is in the optimizer and the checkpoints) and dropped
        from the export. A decoder trained from scratch on little speech learns a language model
        and ignores the audio; a CTC loss on the encoder makes the encoder carry the words."""
        core = _core(self.model)
        if not hasattr(core, CTC_HEAD):
            head = nn.Linear(core.config.d_model, core.config.vocab_size + 1)
            core.add_module(CTC_HEAD, head.to(device=self.device, dtype=core.dtype))

    def ctc_loss(self, context: AudioContext, targets: list[list[int]]) -> torch.Tensor:
        """Mean CTC loss (per target token) of the transcripts (without end-of-text) on every
        encoder position; the blank is the extra last class."""
        assert isinstance(context, WhisperContext)
        core = _core(self.model)
        head = getattr(core, CTC_HEAD, None)
        if head is None:
            raise ModelError("ctc_loss needs add_ctc_head() first")
        hidden = context.hidden_states
        log_probs = torch.log_softmax(head(hidden).float(), dim=-1).transpose(0, 1)  # (T, B, V + 1)
        labels = [[t for t in ids if t != self.eos_id] for ids in targets]
        flat = torch.tensor([t for ids in labels for t in ids], dtype=torch.long, device=hidden.device)
        lengths = torch.tensor([len(ids) for ids in labels], dtype=torch.long, device=hidden.device)
        frames = torch.full((len(labels),), hidden.shape[1], dtype=torch.long, device=hidden.device)
        return nn.functional.ctc_loss(log_probs, flat, frames, lengths, blank=core.config.vocab_size, zero_infinity=True)

    @torch.no_grad()
    def generate(
        self,
        context: AudioContext,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        num_return_sequences: int = 1,
        generator: torch.Generator | None = None,
        prefix: list[int] | None = None,
        early_stop: bool = True,
    ) -> Generation:
        core = _core(self.model)
        assert isinstance(context, WhisperContext)
        group = num_return_sequences
        hidden = context.hidden_states
        device = hidden.device
        batch = hidden.shape[0] * group
        max_new_tokens = min(max_new_tokens, self._max_new_tokens)
        # the first step runs once per clip (cross-attention keys/values projected once); its cache
        # and logits are then repeated for the group's samples
        encoder_outputs = BaseModelOutput(last_hidden_state=hidden)
        step_input = torch.tensor([self.prefix_ids + list(prefix or [])] * hidden.shape[0], device=device)
        suppress = torch.tensor(sorted(self._suppress), device=device, dtype=torch.long)
        begin_suppress = torch.tensor(self._begin_suppress, device=device, dtype=torch.long)
        tokens = torch.full((batch, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
        past = None
        grouped = False
        was_training = core.training
        core.eval()
        try:
            for step in range(max_new_tokens):
                # once grouped, the group's samples read their clip's cross-attention keys and
                # values as one longer query: no copy of them per sample
                with _grouped_cross_attention(core, grouped):
                    out = core(
                        encoder_outputs=encoder_outputs,
                        decoder_input_ids=step_input,
                        cache=past,
                        use_cache=True,
                    )
                past = out.cache
                logits = out.logits[:, -1, :].float()
                if step == 0 and group > 1:
                    logits = logits.repeat_interleave(group, dim=0)
                    encoder_outputs = BaseModelOutput(last_hidden_state=hidden.repeat_interleave(group, dim=0))
                    if isinstance(past, EncoderDecoderCache) and not getattr(core, "is_activation_checkpointing", False):
                        # each sample its own self-attention history, the cross-attention once per clip
                        past.self_attention_cache.batch_repeat_interleave(group)
                        grouped = True
                    else:
                        past.batch_repeat_interleave(group)
                if suppress.numel():
                    logits[:, suppress] = float("-inf")
                if step == 0 and not prefix and begin_suppress.numel():
                    logits[:, begin_suppress] = float("-inf")
                chosen = next_tokens(
                    logits, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator
                )
                chosen = torch.where(finished, torch.full_like(chosen, self.pad_id), chosen)
                tokens[:, step] = chosen
                just_done = (chosen == self.eos_id) & ~finished
                lengths = torch.where(just_done, torch.full_like(lengths, step + 1), lengths)
                finished |= just_done
                if early_stop and bool(finished.all()):
                    break
                step_input = chosen.unsqueeze(1)
        finally:
            core.train(was_training)
        token_ids = [tokens[row, : int(lengths[row])].tolist() for row in range(batch)]
        return Generation(token_ids=token_ids, texts=self.decode(token_ids))

    # -- parameters --------------------------------------------------------------------------

    @property
    def encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in _core(self.model).model.encoder.parameters())

    def _suppressed_ids(self) -> set[int]:
        """Tokens a transcript never contains: special tokens (but end-of-text) and timestamps."""
        tok = self.tokenizer
        suppress = set(tok.all_special_ids) - {self.eos_id}
        no_ts = tok.convert_tokens_to_ids("<|notimestamps|>")
        vocab = _core(self.model).config.vocab_size
        if isinstance(no_ts, int) and no_ts >= 0:
            suppress.update(range(no_ts, vocab))
        for token in ("<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>"):
            tid = tok.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid >= 0 and tid != tok.unk_token_id:
                suppress.add(tid)
        extra = getattr(_core(self.model).generation_config, "suppress_tokens", None) or []
        suppress.update(int(t) for t in extra)
        suppress.discard(self.eos_id)
        return {t for t in suppress if 0 <= t < vocab}


# ---------------------------------------------------------------------------------------------
# tiny models for tests, examples and the quickstart


def build_tiny_whisper(
    output_dir: str | Path,
    texts: list[str],
    *,
    vocab_size: int = 1000,
    d_model: int = 64,
    encoder_layers: int = 2,
    decoder_layers: int = 2,
    attention_heads: int = 4,
    ffn_dim: int = 256,
    num_mel_bins: int = 80,
    chunk_seconds: int = 5,
    max_target_positions: int = 128,
    pad_vocab_to: int | None = None,
    seed: int = 0,
) -> Path:
    """Build a small Whisper with random weights and a byte-level BPE trained on `texts`, and
    save it (model, processor, generation config) so that `from_pretrained` loads it back.

    Short windows (`chunk_seconds`) keep the encoder small: 5 s gives 250 encoder positions.
    `pad_vocab_to` grows the output layer to a real model's vocabulary (51865 for Whisper) for
    benchmarks; the extra ids are never generated.
    """
    if not texts:
        raise ModelError("build_tiny_whisper needs some texts to train its tokenizer on")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    vocab, merges = train_byte_bpe(texts, vocab_size, ["<|endoftext|>"])
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    # The language tokens must follow <|startoftranscript|> directly: the tokenizer derives a
    # language's id from its offset after that token.
    specials = ["<|startoftranscript|>"] + [f"<|{code}|>" for code in LANGUAGES] + [
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    # models built here keep the padding every AudioRL model so far was trained with
    extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, chunk_length=chunk_seconds, **{PADDING: "waveform"})
    frames = extractor.nb_max_frames
    config = WhisperConfig(
        vocab_size=max(len(tokenizer), pad_vocab_to or 0),
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=attention_heads,
        decoder_attention_heads=attention_heads,
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim,
        max_source_positions=frames // 2,
        max_target_positions=max_target_positions,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    # A fresh GenerationConfig: one derived from the model config is saved with
    # `_from_model_config` and Whisper's fields would be dropped on reload.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=max_target_positions,
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
    )
    model.save_pretrained(out)
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    return out
