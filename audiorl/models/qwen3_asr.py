"""Qwen3-ASR (`Qwen3ASRForConditionalGeneration`) behind the adapter contract.

The prompt is the processor's own chat template: an optional system turn (`model.instruction`,
which Qwen3-ASR reads as context such as hotwords), the user turn holding the audio, and the
assistant turn prefilled with `language <Name><asr_text>` so that the completion is the
transcript alone, ended by `<|im_end|>`. The audio tower packs the valid frames of every clip into
one sequence; it is split back per clip by each clip's own length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    Qwen2Tokenizer,
    Qwen3ASRConfig,
    Qwen3ASREncoderConfig,
    Qwen3ASRFeatureExtractor,
    Qwen3ASRForConditionalGeneration,
    Qwen3ASRProcessor,
    Qwen3Config,
)
from transformers.models.qwen3_asr.modeling_qwen3_asr import Qwen3ASREncoder
from transformers.models.qwen3_asr.processing_qwen3_asr import LANGUAGE_CODE_TO_NAME

from audiorl.config import ModelConfig
from audiorl.models.audio_llm import TransformersAudioLLMAdapter
from audiorl.models.base import apply_trainable_settings, load_pretrained
from audiorl.models.tiny import train_byte_bpe

_MARK = "\x00"


class Qwen3ASRAdapter(TransformersAudioLLMAdapter):
    family = "qwen3_asr"

    def __init__(self, model: nn.Module, processor, config: ModelConfig):
        tok = processor.tokenizer
        self.audio_token_id = processor.audio_token_id
        self.stop_ids = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
        super().__init__(model, processor, config)
        self._prompt = self._prompt_text()

    @classmethod
    def from_pretrained(cls, config: ModelConfig, device: torch.device | str = "cpu") -> Qwen3ASRAdapter:
        model, processor = load_pretrained(Qwen3ASRForConditionalGeneration, config, "Qwen3-ASR")
        model.to(device)
        model = apply_trainable_settings(model, config, model.model.audio_tower, model.model.multi_modal_projector)
        return cls(model, processor, config)


    def _prompt_text(self) -> str:
        messages = []
        if self.config.instruction:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.config.instruction}]})
        messages.append({"role": "user", "content": [{"type": "audio", "path": "clip.wav"}]})
        language = self.config.language
        name = LANGUAGE_CODE_TO_NAME.get(language, language) if language else None
        prefill = f"language {name}<asr_text>" if name else ""
        messages.append({"role": "assistant", "content": [{"type": "text", "text": prefill}]})
        text = self.processor.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        if isinstance(text, list):
            text = text[0]
        return text.replace(self.processor.audio_token, _MARK, 1)

    # -- family hooks ------------------------------------------------------------------------

    def features(self, waveforms: list[np.ndarray]) -> dict[str, torch.Tensor]:
        out = self.feature_extractor(
            waveforms, sampling_rate=self.sampling_rate, return_tensors="pt", padding=True, return_attention_mask=True
        )
        mask = out.get("input_features_mask", out.get("attention_mask"))
        return {"input_features": out["input_features"], "input_features_mask": mask}

    def audio_embeddings(self, features, core):
        inner = core.model
        tower = inner.audio_tower
        feats = features["input_features"].to(dtype=next(tower.parameters()).dtype)
        mask = features["input_features_mask"]
        packed = inner.get_audio_features(feats, mask, return_dict=True).pooler_output
        chunk = tower.n_window * 2
        batch = mask.shape[0]
        per_chunk = mask.view(batch, -1, chunk).sum(-1).to(torch.long)
        counts = Qwen3ASREncoder._post_cnn_length(per_chunk).sum(-1).tolist()
        return list(torch.split(packed, counts))

    def prompt_ids(self, num_audio_tokens: int) -> list[int]:
        return self.split_template(self._prompt, _MARK, num_audio_tokens)



# A chat template in the layout of Qwen3-ASR's: system turn, user turn with the audio between
# audio start/end markers, assistant turn.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' %}{{ '<|audio_start|><|audio_pad|><|audio_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if not (loop.last and continue_final_message) %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_qwen3_asr(
    output_dir: str | Path,
    texts: list[str],
    *,
    vocab_size: int = 600,
    hidden_size: int = 64,
    audio_d_model: int = 64,
    audio_layers: int = 2,
    text_layers: int = 2,
    heads: int = 4,
    num_mel_bins: int = 128,
    seed: int = 0,
) -> Path:
    """A Qwen3-ASR with random weights and its own byte-level BPE, saved for `from_pretrained`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = train_byte_bpe(texts + ["language English"], vocab_size, ["<|endoftext|>"])
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "audio_token": "<|audio_pad|>",
            "audio_bos_token": "<|audio_start|>",
            "audio_eos_token": "<|audio_end|>",
        },
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<asr_text>"]})
    extractor = Qwen3ASRFeatureExtractor(feature_size=num_mel_bins)
    processor = Qwen3ASRProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE)
    config = Qwen3ASRConfig(
        audio_config=Qwen3ASREncoderConfig(
            num_mel_bins=num_mel_bins,
            encoder_layers=audio_layers,
            encoder_attention_heads=heads,
            encoder_ffn_dim=4 * audio_d_model,
            d_model=audio_d_model,
            output_dim=hidden_size,
            downsample_hidden_size=32,
        ),
        text_config=Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=hidden_size // heads,
            max_position_embeddings=1024,
        ),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio_pad|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")],
    )
    torch.manual_seed(seed)
    Qwen3ASRForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out
