"""Qwen2-Audio (`Qwen2AudioForConditionalGeneration`) behind the adapter contract.

Prompts:
- base model: `<|audio_bos|><|AUDIO|>…<|audio_eos|>Detect the language and recognize the speech: <|en|>`,
  the completion is the transcript and `<|endoftext|>`;
- instruct model (`model.prompt_format: chat`, or a name containing "instruct"): the processor's own
  chat template with an audio content part and the instruction, the completion is the transcript
  and `<|im_end|>`.

Audio features are the Whisper-style 128-bin log-mel of the processor, padded to the encoder's
window; the number of audio tokens per clip follows the clip's true length, as in the model's own
forward pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2Config,
    Qwen2Tokenizer,
    WhisperFeatureExtractor,
)
from transformers.masking_utils import create_bidirectional_mask

from audiorl.config import ModelConfig
from audiorl.models.audio_llm import TransformersAudioLLMAdapter, wants_chat
from audiorl.models.base import apply_trainable_settings, load_pretrained
from audiorl.models.tiny import train_byte_bpe

DEFAULT_INSTRUCTION = "Detect the language and recognize the speech:"


class Qwen2AudioAdapter(TransformersAudioLLMAdapter):
    family = "qwen2_audio"

    def __init__(self, model: nn.Module, processor, config: ModelConfig):
        tok = processor.tokenizer
        self.audio_token_id = tok.convert_tokens_to_ids(processor.audio_token)
        self.chat = wants_chat(config)
        end = "<|im_end|>" if self.chat else "<|endoftext|>"
        self.stop_ids = [tok.convert_tokens_to_ids(end), tok.convert_tokens_to_ids("<|endoftext|>")]
        super().__init__(model, processor, config)

    @classmethod
    def from_pretrained(cls, config: ModelConfig, device: torch.device | str = "cpu") -> Qwen2AudioAdapter:
        model, processor = load_pretrained(Qwen2AudioForConditionalGeneration, config, "Qwen2-Audio")
        model.to(device)
        model = apply_trainable_settings(model, config, model.model.audio_tower, model.model.multi_modal_projector)
        return cls(model, processor, config)

    @property
    def window_seconds(self) -> float:
        """Qwen2-Audio hears Whisper's fixed window (30 s in the released models): features are padded
        and cut to it, so the rest of a longer clip would be lost without a word."""
        return self.feature_extractor.n_samples / self.sampling_rate

    # -- family hooks ------------------------------------------------------------------------

    def features(self, waveforms: list[np.ndarray]) -> dict[str, torch.Tensor]:
        out = self.feature_extractor(
            waveforms,
            sampling_rate=self.sampling_rate,
            return_tensors="pt",
            padding="max_length",
            return_attention_mask=True,
        )
        return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}

    def audio_embeddings(self, features, core):
        inner = core.model
        tower = inner.audio_tower
        feats = features["input_features"].to(dtype=tower.conv1.weight.dtype)
        mask = features["feature_attention_mask"]
        feat_lengths, out_lengths = tower._get_feat_extract_output_lengths(mask.sum(-1))
        batch, _, frames = feats.shape
        width = (frames - 2) // 2 + 1
        valid = torch.arange(width, device=feats.device).unsqueeze(0) < feat_lengths.unsqueeze(1)
        attention = create_bidirectional_mask(
            config=tower.config,
            inputs_embeds=torch.zeros((batch, width, 1), dtype=feats.dtype, device=feats.device),
            attention_mask=valid.long(),
        )
        hidden = tower(feats, attention_mask=attention).last_hidden_state
        projected = inner.multi_modal_projector(hidden)
        return [projected[i, : int(out_lengths[i])] for i in range(batch)]

    def prompt_ids(self, num_audio_tokens: int) -> list[int]:
        instruction = self.config.instruction or DEFAULT_INSTRUCTION
        if self.chat:
            messages = [
                {"role": "user", "content": [{"type": "audio", "audio_url": "clip.wav"}, {"type": "text", "text": instruction}]}
            ]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            text = text.replace("<|audio_bos|><|AUDIO|><|audio_eos|>", "<|audio_bos|>\x00<|audio_eos|>")
        else:
            lang = f" <|{self.config.language}|>" if self.config.language else ""
            text = f"<|audio_bos|>\x00<|audio_eos|>{instruction}{lang}"
        return self.split_template(text, "\x00", num_audio_tokens)



def build_tiny_qwen2_audio(
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
    chunk_seconds: int = 5,
    seed: int = 0,
) -> Path:
    """A Qwen2-Audio with random weights, its own byte-level BPE with the Qwen special tokens, a
    Whisper feature extractor of `chunk_seconds` windows, saved for `from_pretrained`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = train_byte_bpe(texts + [DEFAULT_INSTRUCTION], vocab_size, ["<|endoftext|>"])
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    specials = ["<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|en|>", "<|zh|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, chunk_length=chunk_seconds)
    processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer)
    config = Qwen2AudioConfig(
        audio_config=Qwen2AudioEncoderConfig(
            num_mel_bins=num_mel_bins,
            encoder_layers=audio_layers,
            encoder_attention_heads=heads,
            encoder_ffn_dim=4 * audio_d_model,
            d_model=audio_d_model,
            max_source_positions=extractor.nb_max_frames // 2,
        ),
        text_config=Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=1024,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        ),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    torch.manual_seed(seed)
    Qwen2AudioForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out
