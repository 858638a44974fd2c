"""Step-Audio 2 (mini) without `trust_remote_code`: AudioRL's own implementation of the
architecture, with the published checkpoint's config fields and parameter names, so that
`from_pretrained` on a downloaded Step-Audio-2-mini directory loads it with no remote code.

Architecture (arXiv 2507.16632 and the published modeling code):
- `encoder`: a Whisper-style audio encoder, 128 log-mel bins at 100 frames/s; conv1 (k3),
  conv2 (k3, stride 2), learned positions, `n_audio_layer` pre-norm blocks (`attn` with
  query/key/value/out, `attn_ln`, `mlp` as Linear-GELU-Linear, `mlp_ln`), then 2x average
  pooling and `after_norm`: 25 frames/s;
- `adapter`: Conv1d (kernel `kernel_size`, stride `adapter_stride`, padding 1) with GELU, then
  Linear(n_state, 2048)-ReLU-Linear(2048, llm_dim): 12.5 frames/s;
- `model` + `lm_head`: a Qwen2 language model. Audio frames replace `<audio_patch>` placeholders
  between `<audio_start>` and `<audio_end>`.

What was checked against public sources and what is assumed is listed in the README.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, Qwen2Config, Qwen2Model, Qwen2Tokenizer
from transformers.audio_utils import mel_filter_bank
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from audiorl.config import ModelConfig
from audiorl.models.audio_llm import AudioLLMAdapter, core_model
from audiorl.models.base import apply_trainable_settings, load_pretrained
from audiorl.models.tiny import train_byte_bpe

ASR_INSTRUCTION = "请记录下你所听到的语音内容。"  # "Write down the speech you hear." (Step-Audio 2's ASR system prompt)
AUDIO_FIELDS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "llm_dim", "kernel_size", "adapter_stride")


class StepAudio2Config(PretrainedConfig):
    """Fields as in the published config.json: `audio_encoder_config` and `text_config`."""

    model_type = "step_audio_2"

    def __init__(self, audio_encoder_config: dict | None = None, text_config: dict | Qwen2Config | None = None, **kwargs):
        super().__init__(**kwargs)
        audio = dict(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
                     llm_dim=3584, kernel_size=3, adapter_stride=2)
        audio.update({k: v for k, v in (audio_encoder_config or {}).items() if k in AUDIO_FIELDS})
        self.audio_encoder_config = audio
        if isinstance(text_config, Qwen2Config):
            self.text_config = text_config
        else:
            known = Qwen2Config().to_dict().keys()
            # the published text_config also carries num_attention_groups (= num_key_value_heads)
            self.text_config = Qwen2Config(**{k: v for k, v in (text_config or {}).items() if k in known})

    def to_dict(self):
        out = super().to_dict()
        out["text_config"] = self.text_config.to_dict() if hasattr(self.text_config, "to_dict") else self.text_config
        out["text_config"]["num_attention_groups"] = out["text_config"].get("num_key_value_heads")
        return out


def _register() -> None:
    """Let AutoConfig (and so AutoTokenizer, which reads config.json) know the model type."""
    try:
        AutoConfig.register(StepAudio2Config.model_type, StepAudio2Config)
    except ValueError:  # already registered
        pass


_register()


class _Attention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y):
            return y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), attn_mask=bias)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class _Block(GradientCheckpointingLayer):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = _Attention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), bias)
        return x + self.mlp(self.mlp_ln(x))


class StepAudio2Encoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.positional_embedding = nn.Embedding(n_ctx, n_state)
        self.positional_embedding.requires_grad_(False)
        self.blocks = nn.ModuleList([_Block(n_state, n_head) for _ in range(n_layer)])
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.after_norm = nn.LayerNorm(n_state)

    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, n_mels, T), lengths (B,) -> (B, T/4, n_state), lengths after pooling."""
        frames = mel.shape[-1]
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        # keys past a clip's end are masked; the stride-2 conv keeps every other frame, starting
        # where the published code starts ((T + 1) % 2)
        valid = torch.arange(frames, device=mel.device).unsqueeze(0) < mel_lengths.unsqueeze(1)
        valid = valid[:, (frames + 1) % 2 :: 2][:, : x.shape[1]]
        bias = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(~valid, -1e10)[:, None, None, :]
        x = x + self.positional_embedding.weight[: x.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x, bias)
        x = self.avg_pooler(x.transpose(1, 2)).transpose(1, 2)
        return self.after_norm(x), (mel_lengths + 1) // 2 // 2


class StepAudio2Adaptor(nn.Module):
    def __init__(self, n_state: int, llm_dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(n_state, n_state, kernel_size, stride, padding=1)
        self.linear1 = nn.Linear(n_state, 2048)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(2048, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.linear2(self.relu(self.linear1(x)))


class StepAudio2ForCausalLM(PreTrainedModel):
    config_class = StepAudio2Config
    base_model_prefix = "step_audio2"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "_Block"]
    _supports_sdpa = True

    def __init__(self, config: StepAudio2Config):
        super().__init__(config)
        audio = config.audio_encoder_config
        self.model = Qwen2Model(config.text_config)
        self.encoder = StepAudio2Encoder(
            audio["n_mels"], audio["n_audio_ctx"], audio["n_audio_state"], audio["n_audio_head"], audio["n_audio_layer"]
        )
        self.adapter = StepAudio2Adaptor(audio["n_audio_state"], audio["llm_dim"], audio["kernel_size"], audio["adapter_stride"])
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        audio_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        """Token ids with one `audio_token_id` per audio frame, the clips' log-mels -> logits (and
        the mean next-token loss over labels that are not -100)."""
        embeds = self.model.embed_tokens(input_ids)
        if input_features is not None:
            audio = torch.cat(self.audio_embeddings(input_features, feature_lengths))
            slots = (input_ids == audio_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(slots, audio.to(embeds.dtype))
        logits = self.lm_head(self.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def audio_embeddings(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> list[torch.Tensor]:
        hidden, lengths = self.encoder(mel, mel_lengths)
        projected = self.adapter(hidden)
        lengths = (lengths - 1) // 2 + 1  # the adapter's stride-2 conv
        return [projected[i, : int(lengths[i])] for i in range(projected.shape[0])]


class StepAudio2FeatureExtractor:
    """Step-Audio 2's log-mel: 479 samples of right padding, 25 ms Hann window, 10 ms hop,
    128 Slaney mel bins, log10, floor at max - 8, then (x + 4) / 4. Batches are zero-padded in time."""

    sampling_rate = 16000

    def __init__(self, n_mels: int = 128):
        self.n_mels = n_mels
        self.filters = torch.from_numpy(
            mel_filter_bank(
                num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
                sampling_rate=16000, norm="slaney", mel_scale="slaney",
            )
        ).float()

    def mel(self, waveform: np.ndarray) -> torch.Tensor:
        audio = F.pad(torch.from_numpy(np.asarray(waveform, dtype=np.float32)), (0, 479))
        stft = torch.stft(audio, 400, 160, window=torch.hann_window(400), return_complex=True)
        power = stft[..., :-1].abs() ** 2
        log_spec = torch.clamp(self.filters.T @ power, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0

    def __call__(self, waveforms: list[np.ndarray]) -> dict[str, torch.Tensor]:
        mels = [self.mel(w) for w in waveforms]
        lengths = torch.tensor([m.shape[-1] for m in mels])
        batch = torch.zeros((len(mels), self.n_mels, int(lengths.max())))
        for i, m in enumerate(mels):
            batch[i, :, : m.shape[-1]] = m
        return {"input_features": batch, "feature_lengths": lengths}


class StepAudio2Processor:
    """The tokenizer of the checkpoint plus AudioRL's feature extractor."""

    def __init__(self, tokenizer, n_mels: int):
        self.tokenizer = tokenizer
        self.feature_extractor = StepAudio2FeatureExtractor(n_mels)

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(directory)


class StepAudio2Adapter(AudioLLMAdapter):
    family = "step_audio2"

    def __init__(self, model: nn.Module, processor: StepAudio2Processor, config: ModelConfig):
        tok = processor.tokenizer
        self.audio_token_id = tok.convert_tokens_to_ids("<audio_patch>")
        vocab = tok.get_vocab()
        self.stop_ids = [vocab[s] for s in ("<|im_end|>", "<|endoftext|>", "<|EOT|>") if s in vocab]
        super().__init__(model, processor, config)

    @classmethod
    def from_pretrained(cls, config: ModelConfig, device: torch.device | str = "cpu") -> StepAudio2Adapter:
        model, tokenizer = load_pretrained(StepAudio2ForCausalLM, config, "Step-Audio 2", AutoTokenizer.from_pretrained)
        model.to(device)
        processor = StepAudio2Processor(tokenizer, model.config.audio_encoder_config["n_mels"])
        model = apply_trainable_settings(model, config, model.encoder, model.adapter)
        return cls(model, processor, config)


    def features(self, waveforms: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return self.feature_extractor(waveforms)

    def audio_embeddings(self, features, core):
        mel = features["input_features"].to(dtype=core.encoder.conv1.weight.dtype)
        return core.audio_embeddings(mel, features["feature_lengths"])

    def prompt_ids(self, num_audio_tokens: int) -> list[int]:
        instruction = self.config.instruction or ASR_INSTRUCTION
        text = (
            f"<|im_start|>system\n{instruction}<|im_end|>\n"
            f"<|im_start|>user\n<audio_start>\x00<audio_end><|im_end|>\n<|im_start|>assistant\n"
        )
        return self.split_template(text, "\x00", num_audio_tokens)

    def embed_tokens(self, core):
        return core.model.embed_tokens

    def decoder(self, core):
        return core.model

    def lm_head(self, core):
        return core.lm_head

    @property
    def max_positions(self) -> int:
        return int(core_model(self.model).config.text_config.max_position_embeddings)

    @property
    def encoder_trainable(self) -> bool:
        core = core_model(self.model)
        return any(p.requires_grad for m in (core.encoder, core.adapter) for p in m.parameters())


def published_parameter_names(config: StepAudio2Config) -> list[str]:
    """Every parameter name of a Step-Audio 2 checkpoint with this config, spelled as the published
    weights spell them (independent of this module's classes)."""
    audio, text = config.audio_encoder_config, config.text_config
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(text.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{n}_proj.{k}" for n in ("q", "k", "v") for k in ("weight", "bias")]
        names += [p + "self_attn.o_proj.weight", p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    names += [f"encoder.conv{c}.{k}" for c in (1, 2) for k in ("weight", "bias")]
    names += ["encoder.positional_embedding.weight", "encoder.after_norm.weight", "encoder.after_norm.bias"]
    for i in range(audio["n_audio_layer"]):
        p = f"encoder.blocks.{i}."
        names += [p + "attn.query.weight", p + "attn.query.bias", p + "attn.key.weight"]
        names += [p + "attn.value.weight", p + "attn.value.bias", p + "attn.out.weight", p + "attn.out.bias"]
        names += [p + f"{ln}.{k}" for ln in ("attn_ln", "mlp_ln") for k in ("weight", "bias")]
        names += [p + f"mlp.{j}.{k}" for j in (0, 2) for k in ("weight", "bias")]
    names += [f"adapter.{m}.{k}" for m in ("conv", "linear1", "linear2") for k in ("weight", "bias")]
    return names


def build_tiny_step_audio2(
    output_dir: str | Path,
    texts: list[str],
    *,
    vocab_size: int = 600,
    hidden_size: int = 64,
    n_audio_state: int = 64,
    audio_layers: int = 2,
    text_layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """A tiny Step-Audio 2 with random weights in the published layout (config.json fields,
    safetensors parameter names, a Qwen2 tokenizer with the audio and chat tokens)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = train_byte_bpe(texts + [ASR_INSTRUCTION, "system user assistant"], vocab_size, ["<|endoftext|>"])
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    specials = ["<|im_start|>", "<|im_end|>", "<|EOT|>", "<audio_start>", "<audio_end>", "<audio_patch>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    config = StepAudio2Config(
        audio_encoder_config=dict(n_mels=128, n_audio_ctx=1500, n_audio_state=n_audio_state, n_audio_head=heads,
                                  n_audio_layer=audio_layers, llm_dim=hidden_size, kernel_size=3, adapter_stride=2),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=2048),
        architectures=["StepAudio2ForCausalLM"],
    )
    torch.manual_seed(seed)
    StepAudio2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
