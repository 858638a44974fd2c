"""Decoder-only audio language models (Qwen2-Audio, Qwen3-ASR, Step-Audio 2) behind the adapter
contract.

They share one shape: an audio encoder and a projector turn each clip into a run of embeddings
that replace placeholder tokens in a text prompt; a causal language model continues the prompt
with the transcript. `encode` builds each clip's prompt embeddings once (audio tower and
projector run once per clip); `sequence_logps` appends each target's token embeddings to its
clip's prompt and scores only the target tokens; `generate` decodes with the KV cache from
left-padded prompts.

A family supplies five things: its audio embeddings per clip, its prompt token ids for a given
number of audio tokens, and where its token embedding, decoder stack and LM head live.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from audiorl.config import ModelConfig
from audiorl.models.base import AudioContext, Generation, ModelAdapter, SequenceLogps, score_tokens
from audiorl.models.sampling import next_tokens


class PromptContext(AudioContext):
    """Right-padded prompt embeddings (B, P, D), audio spliced in, and each prompt's length."""

    def __init__(self, embeds: torch.Tensor, lengths: torch.Tensor):
        self.embeds = embeds
        self.lengths = lengths

    def select(self, index: torch.Tensor) -> PromptContext:
        index = index.to(self.embeds.device)
        return PromptContext(self.embeds.index_select(0, index), self.lengths.index_select(0, index.to(self.lengths.device)))

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]


def _append_rows(context: PromptContext, extra: torch.Tensor) -> PromptContext:
    rows = [torch.cat([context.embeds[i, :n], extra]) for i, n in enumerate(context.lengths.tolist())]
    lengths = context.lengths + extra.shape[0]
    return PromptContext(nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths)


def wants_chat(config: ModelConfig) -> bool:
    """`prompt_format: auto` means the chat template for instruct checkpoints, the base prompt otherwise."""
    if config.prompt_format == "auto":
        return "instruct" in config.name_or_path.lower()
    return config.prompt_format == "chat"


def core_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a possible peft wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class AudioLLMAdapter(ModelAdapter):
    """Shared machinery; subclasses fill in the family hooks below."""

    #: id of the placeholder token that audio embeddings replace
    audio_token_id: int
    #: ids that end a completion (the first is appended to training targets)
    stop_ids: list[int]

    def __init__(self, model: nn.Module, processor, config: ModelConfig):
        super().__init__(model, config)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.feature_extractor = processor.feature_extractor
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else self.stop_ids[0]
        self._suppress = sorted(set(self.tokenizer.all_special_ids) - set(self.stop_ids))

    # -- family hooks ------------------------------------------------------------------------

    @abstractmethod
    def audio_embeddings(self, features: dict[str, torch.Tensor], core: nn.Module) -> list[torch.Tensor]:
        """Per clip, the projected audio embeddings (n_i, D) that fill its placeholders."""

    @abstractmethod
    def prompt_ids(self, num_audio_tokens: int) -> list[int]:
        """The prompt for one clip, with `num_audio_tokens` placeholder ids where the audio goes."""

    @abstractmethod
    def embed_tokens(self, core: nn.Module) -> nn.Module: ...

    @abstractmethod
    def decoder(self, core: nn.Module) -> nn.Module:
        """The causal stack: takes inputs_embeds, attention_mask, position_ids, cache, use_cache."""

    @abstractmethod
    def lm_head(self, core: nn.Module) -> nn.Module: ...

    @property
    @abstractmethod
    def max_positions(self) -> int: ...

    # -- shared helpers for families ---------------------------------------------------------

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def split_template(self, text: str, marker: str, num_audio_tokens: int) -> list[int]:
        """Tokenise a prompt string holding one `marker` where the audio placeholders go."""
        if text.count(marker) != 1:
            raise ValueError(f"the prompt must hold {marker!r} exactly once: {text!r}")
        before, after = text.split(marker)
        return self.tokens(before) + [self.audio_token_id] * num_audio_tokens + self.tokens(after)

    # -- data --------------------------------------------------------------------------------

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    @property
    def max_target_tokens(self) -> int:
        return min(448, self.max_positions // 2)

    def target_ids(self, texts: list[str]) -> list[list[int]]:
        encoded = self.tokenizer([t.strip() for t in texts], add_special_tokens=False)["input_ids"]
        return [ids + [self.stop_ids[0]] for ids in encoded]

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.stop_ids)

    def decode(self, token_ids: list[list[int]]) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    # -- compute -----------------------------------------------------------------------------

    def encode(self, features: dict[str, torch.Tensor], model: nn.Module | None = None) -> PromptContext:
        core = core_model(model if model is not None else self.model)
        embed = self.embed_tokens(core)
        device = embed.weight.device
        features = {k: v.to(device) for k, v in features.items()}
        rows = []
        for audio in self.audio_embeddings(features, core):
            ids = torch.tensor(self.prompt_ids(audio.shape[0]), device=device)
            tokens = embed(ids)
            slots = (ids == self.audio_token_id).nonzero().squeeze(-1)
            # index_put keeps the graph to the audio tower when it trains
            rows.append(tokens.index_put((slots,), audio.to(tokens.dtype)))
        lengths = torch.tensor([r.shape[0] for r in rows], device=device)
        return PromptContext(nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths)

    def sequence_logps(
        self,
        context: AudioContext,
        targets: list[list[int]],
        index: torch.Tensor | None = None,
        model: nn.Module | None = None,
    ) -> SequenceLogps:
        core = core_model(model if model is not None else self.model)
        assert isinstance(context, PromptContext)
        if index is not None:
            context = context.select(index)
        if context.batch_size != len(targets):
            raise ValueError(f"{len(targets)} targets for {context.batch_size} context rows")
        device = context.embeds.device
        longest = max(len(t) for t in targets)
        if longest > self.max_target_tokens:
            raise ValueError(f"a target has {longest} tokens; this model scores at most {self.max_target_tokens}")
        n = len(targets)
        labels = torch.full((n, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.float32)
        for row, ids in enumerate(targets):
            labels[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1.0
        labels, mask = labels.to(device), mask.to(device)
        target_embeds = self.embed_tokens(core)(labels[:, :-1]) if longest > 1 else None
        # each row: its prompt, then target[:-1]; right-padded
        rows, prompt_lens = [], context.lengths.tolist()
        for row, ids in enumerate(targets):
            parts = [context.embeds[row, : prompt_lens[row]]]
            if len(ids) > 1:
                parts.append(target_embeds[row, : len(ids) - 1])
            rows.append(torch.cat(parts))
        inputs = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        attention = torch.zeros(inputs.shape[:2], dtype=torch.long, device=device)
        for row, r in enumerate(rows):
            attention[row, : r.shape[0]] = 1
        hidden = self.decoder(core)(inputs_embeds=inputs, attention_mask=attention, use_cache=False).last_hidden_state
        # the hidden state at prompt_len - 1 + j predicts target token j
        positions = torch.tensor(prompt_lens, device=device).unsqueeze(1) - 1 + torch.arange(longest, device=device)
        positions = positions.clamp(max=hidden.shape[1] - 1)
        picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return score_tokens(self.lm_head(core)(picked), labels, mask)

    def _with_prefix(self, context: PromptContext, prefix: list[int], core: nn.Module) -> PromptContext:
        ids = torch.tensor(prefix, device=context.embeds.device)
        return _append_rows(context, self.embed_tokens(core)(ids).to(context.embeds.dtype))

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
        core = core_model(self.model)
        assert isinstance(context, PromptContext)
        group = num_return_sequences
        if prefix:
            context = self._with_prefix(context, prefix, core)
        device, batch = context.embeds.device, context.batch_size
        lengths = context.lengths.tolist()
        width = max(lengths)
        # left-pad the prompts so that every row's next token sits in the last column
        inputs = context.embeds.new_zeros((batch, width, context.embeds.shape[-1]))
        attention = torch.zeros((batch, width), dtype=torch.long, device=device)
        for row, n in enumerate(lengths):
            inputs[row, width - n :] = context.embeds[row, :n]
            attention[row, width - n :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        embed, decoder, head = self.embed_tokens(core), self.decoder(core), self.lm_head(core)
        # the prompt (audio included) is prefilled once per clip; its cache is then repeated for
        # the group's samples
        if group > 1:
            batch = batch * group
            attention = attention.repeat_interleave(group, dim=0)
            positions = positions.repeat_interleave(group, dim=0)
        stop = torch.tensor(self.stop_ids, device=device)
        suppress = torch.tensor(self._suppress, device=device, dtype=torch.long)
        max_new_tokens = min(max_new_tokens, self.max_target_tokens)
        tokens = torch.full((batch, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        out_len = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
        was_training = core.training
        core.eval()
        try:
            prefill_mask = attention[::group]
            out = decoder(inputs_embeds=inputs, attention_mask=prefill_mask, position_ids=positions[::group], use_cache=True)
            last = out.last_hidden_state[:, -1, :]
            if group > 1:
                last = last.repeat_interleave(group, dim=0)
                out.cache.batch_repeat_interleave(group)
            for step in range(max_new_tokens):
                if step > 0:
                    last = out.last_hidden_state[:, -1, :]
                logits = head(last).float()
                if suppress.numel():
                    logits[:, suppress] = float("-inf")
                chosen = next_tokens(logits, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
                chosen = torch.where(finished, torch.full_like(chosen, self.pad_id), chosen)
                tokens[:, step] = chosen
                done = torch.isin(chosen, stop) & ~finished
                out_len = torch.where(done, torch.full_like(out_len, step + 1), out_len)
                finished |= done
                if early_stop and bool(finished.all()):
                    break
                attention = torch.cat([attention, attention.new_ones((batch, 1))], dim=1)
                positions = positions[:, -1:] + 1
                out = decoder(
                    inputs_embeds=embed(chosen.unsqueeze(1)),
                    attention_mask=attention,
                    position_ids=positions,
                    cache=out.cache,
                    use_cache=True,
                )
        finally:
            core.train(was_training)
        token_ids = [tokens[row, : int(out_len[row])].tolist() for row in range(batch)]
        return Generation(token_ids=token_ids, texts=self.decode(token_ids))





class TransformersAudioLLMAdapter(AudioLLMAdapter):
    """The layout transformers gives its audio LLMs (Qwen2-Audio, Qwen3-ASR, ...): `model.audio_tower`,
    `model.multi_modal_projector`, `model.language_model`, `lm_head`, `config.text_config`."""

    def embed_tokens(self, core):
        return core.model.language_model.embed_tokens

    def decoder(self, core):
        return core.model.language_model

    def lm_head(self, core):
        return core.lm_head

    @property
    def max_positions(self) -> int:
        return int(core_model(self.model).config.text_config.max_position_embeddings)

    @property
    def encoder_trainable(self) -> bool:
        inner = core_model(self.model).model
        return any(p.requires_grad for m in (inner.audio_tower, inner.multi_modal_projector) for p in m.parameters())
