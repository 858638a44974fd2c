"""CTranslate2 models in and out: faster-whisper's Whisper format.

In: a CTranslate2 model directory (`model.bin`, `config.json`, `tokenizer.json`, optionally
`preprocessor_config.json`) becomes a `save_pretrained` Whisper that transformers, AudioRL and
MLflow load like any other. `model.bin` is read from CTranslate2's documented binary layout
(version 6): little-endian; a uint32 version, the spec name, a uint32 revision, a uint32 count of
variables, each a name, a uint8 rank, uint32 dimensions, a uint8 dtype id, a uint32 byte count and
the raw data; then uint32 aliases as (alias, target) pairs. Strings are a uint16 length (the final
NUL included) and the bytes. The architecture is read from the tensors, so every size from tiny to
large-v3 (and the distil models) imports; int8/int16 weights are dequantized with their scales.

Out: a `save_pretrained` Whisper becomes a faster-whisper model through CTranslate2's own
`TransformersConverter` (the tokenizer and preprocessor config copied beside it).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audiorl.errors import ModelError
from audiorl.lazy import on_first_use
from audiorl.models.base import DTYPES
from audiorl.models.registry import detect_family

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_VERSION = 6  # what CTranslate2 3.x and 4.x write
# a model ships one of these beside model.bin; faster-whisper needs the tokenizer
_COPIED_FILES = ("tokenizer.json", "preprocessor_config.json", "vocabulary.json", "vocabulary.txt")
QUANTIZATIONS = ("float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16")

# the Whisper family module imports transformers; `import audiorl.api` should not pay for it
whisper: Any = on_first_use("audiorl.models.whisper")


@dataclass
class CT2Model:
    spec: str
    revision: int
    variables: dict[str, np.ndarray]  # dequantized to float32 where they carried scales
    source_dtype: str  # the weights' stored type: float16, int8, ...


class _Reader:
    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        self.offset = 0

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.offset + size > len(self.data):
            raise ModelError(f"{self.path}: truncated at byte {self.offset} of {len(self.data)}; copy or convert the model again")
        (value,) = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += size
        return value

    def string(self) -> str:
        n = self.take("H")
        raw = self.raw(n)
        if not raw.endswith(b"\0"):
            raise ModelError(f"{self.path}: not a CTranslate2 model file (a string at byte {self.offset - n} lacks its end)")
        return raw[:-1].decode("utf-8", errors="replace")

    def raw(self, n: int) -> bytes:
        if self.offset + n > len(self.data):
            raise ModelError(f"{self.path}: truncated at byte {self.offset} of {len(self.data)}; copy or convert the model again")
        out = self.data[self.offset : self.offset + n]
        self.offset += n
        return out


def read_ct2(path: str | Path) -> CT2Model:
    """The variables of a CTranslate2 `model.bin` as numpy arrays (aliases resolved, quantized
    weights multiplied back by their scales)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file; a CTranslate2 (faster-whisper) model directory holds model.bin")
    reader = _Reader(path)
    version = reader.take("I")
    if version != _VERSION:
        raise ModelError(f"{path}: not a CTranslate2 model file this importer reads (binary version {version}, expected {_VERSION}); "
                         "convert the model again with a current ctranslate2")
    spec = reader.string()
    revision = reader.take("I")
    count = reader.take("I")
    raw: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = reader.string()
        rank = reader.take("B")
        dims = [reader.take("I") for _ in range(rank)]
        dtype_id = reader.take("B")
        nbytes = reader.take("I")
        if dtype_id not in _DTYPES:
            raise ModelError(f"{path}: variable {name!r} has an unknown dtype id {dtype_id}; is this a CTranslate2 model?")
        buffer = reader.raw(nbytes)
        dtype = _DTYPES[dtype_id]
        if dtype == "bfloat16":  # numpy has no bfloat16: widen the 16 bits into a float32's top half
            array = (np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(buffer, dtype=np.dtype(dtype).newbyteorder("<"))
        if array.size != int(np.prod(dims, dtype=np.int64)):
            raise ModelError(f"{path}: variable {name!r} holds {array.size} values for shape {dims}; the file is damaged")
        raw[name] = array.reshape(dims)
    aliases = [(reader.string(), reader.string()) for _ in range(reader.take("I"))]
    if reader.offset != len(reader.data):
        raise ModelError(f"{path}: {len(reader.data) - reader.offset} bytes after the last variable; the file is damaged")

    variables: dict[str, np.ndarray] = {}
    stored = "float32"
    for name, array in raw.items():
        if name.endswith("_scale"):
            continue
        scale = raw.get(name + "_scale")
        if scale is not None and array.dtype in (np.int8, np.int16):
            stored = str(array.dtype)
            # CTranslate2 stores round(w * scale), one scale per output row (int8) or one in all (int16)
            scale = scale.astype(np.float32)
            array = array.astype(np.float32) / (scale.reshape(-1, *([1] * (array.ndim - 1))) if scale.ndim else scale)
        elif array.dtype in (np.float16,) and name.endswith("weight"):
            stored = "float16"
        variables[name] = array
    # after dequantizing: an alias names its target's values, not its target's int8 codes
    for alias, target in aliases:
        if target in variables:
            variables[alias] = variables[target]
    return CT2Model(spec=spec, revision=revision, variables=variables, source_dtype=stored)


def _layers(variables: dict[str, np.ndarray], side: str) -> int:
    found = {int(m.group(1)) for name in variables if (m := re.match(rf"{side}/layer_(\d+)/", name))}
    if found != set(range(len(found))):
        raise ModelError(f"{side} layers {sorted(found)} are not numbered 0..N-1")
    return len(found)


def _scalar(variables: dict[str, np.ndarray], name: str, default: int) -> int:
    value = variables.get(name)
    return int(value.reshape(-1)[0]) if value is not None and value.size else default


def whisper_state_dict(model: CT2Model, source: Path) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """CTranslate2 WhisperSpec variables -> transformers' WhisperForConditionalGeneration names,
    and the architecture read from their shapes."""
    if model.spec != "WhisperSpec":
        raise ModelError(f"{source}: a CTranslate2 {model.spec!r} model, not Whisper (WhisperSpec); only Whisper models import")
    v = dict(model.variables)
    try:
        conv1 = v["encoder/conv1/weight"]
        dims = {
            "d_model": conv1.shape[0],
            "num_mel_bins": conv1.shape[1],
            "encoder_layers": _layers(v, "encoder"),
            "decoder_layers": _layers(v, "decoder"),
            "encoder_ffn_dim": v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
            "decoder_ffn_dim": v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
            "vocab_size": v["decoder/embeddings/weight"].shape[0],
            "max_source_positions": v["encoder/position_encodings/encodings"].shape[0],
            "max_target_positions": v["decoder/position_encodings/encodings"].shape[0],
        }
    except KeyError as exc:
        raise ModelError(f"{source}: Whisper variable {exc} is missing; the model is incomplete") from None
    # Whisper's heads are 64 wide; the spec stores the count too
    dims["encoder_attention_heads"] = _scalar(v, "encoder/num_heads", dims["d_model"] // 64)
    dims["decoder_attention_heads"] = _scalar(v, "decoder/num_heads", dims["d_model"] // 64)

    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in v:
            raise ModelError(f"{source}: Whisper variable {name!r} is missing; the model is incomplete")
        used.add(name)
        return v[name]

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = take(f"{src}/gamma")
        out[f"{dst}.bias"] = take(f"{src}/beta")

    def linear(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = take(f"{src}/weight")
        out[f"{dst}.bias"] = take(f"{src}/bias")

    def stacked(src: str, dst: str, names: tuple[str, ...]) -> None:
        weights = np.split(take(f"{src}/weight"), len(names))
        biases = np.split(take(f"{src}/bias"), len(names))
        for name, w, b in zip(names, weights, biases):
            out[f"{dst}.{name}.weight"] = w
            if name == "k_proj":  # Whisper's key projection has no bias: CTranslate2 stores zeros
                if np.any(b):
                    raise ModelError(f"{source}: {src}/bias has a non-zero key bias, which Whisper does not have")
            else:
                out[f"{dst}.{name}.bias"] = b

    for side in ("encoder", "decoder"):
        for i in range(dims[f"{side}_layers"]):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            stacked(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"))
            linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            if side == "decoder":
                norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
                linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                stacked(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ("k_proj", "v_proj"))
                linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
            norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
            linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        out[f"model.{side}.embed_positions.weight"] = take(f"{side}/position_encodings/encodings")
    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    out["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    # Whisper's output projection is the embedding matrix (an alias in the file, or in a quantized
    # model the same matrix quantized on its own); an untied one would be dropped by the tied
    # model, so it is refused
    projection = v.get("decoder/projection/weight")
    embeddings = out["model.decoder.embed_tokens.weight"]
    if projection is not None and np.abs(projection - embeddings).max() > 0.01 * np.abs(embeddings).max():
        raise ModelError(f"{source}: decoder/projection/weight differs from the embeddings; Whisper ties them")
    used.add("decoder/projection/weight")

    # what is left must be the spec's scalar settings, never a weight we did not place
    leftover = [name for name in v if name not in used and v[name].ndim > 0]
    if leftover:
        raise ModelError(f"{source}: variables this importer does not know: {leftover[:5]}; is this a Whisper model?")
    return out, dims


def _tokenizer(source: Path):
    from transformers import WhisperTokenizer

    path = source / "tokenizer.json"
    if not path.is_file():
        raise ModelError(
            f"{source}: no tokenizer.json; convert the model with `--copy_files tokenizer.json` (ct2-transformers-converter) "
            "or copy the original model's tokenizer.json beside model.bin"
        )
    tokenizer = WhisperTokenizer(tokenizer_file=str(path), unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                                 eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    # Whisper's control tokens (<|startoftranscript|>, languages, tasks, <|notimestamps|>) are
    # special: decoding skips them and no text is ever split into them
    added = json.loads(path.read_text())["added_tokens"]
    specials = [t["content"] for t in sorted(added, key=lambda t: t["id"]) if t["content"] != "<|endoftext|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


def _feature_extractor(source: Path, num_mel_bins: int):
    from transformers import WhisperFeatureExtractor

    path = source / "preprocessor_config.json"
    if path.is_file():
        extractor = WhisperFeatureExtractor.from_pretrained(str(source))
        if extractor.feature_size != num_mel_bins:
            raise ModelError(f"{path}: {extractor.feature_size} mel bins, but the model's first layer takes {num_mel_bins}")
        return extractor
    return WhisperFeatureExtractor(feature_size=num_mel_bins)


def _generation_config(tokenizer, ct2_config: dict, dims: dict[str, int]):
    from transformers import GenerationConfig
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    def token(text: str) -> int | None:
        tid = tokenizer.convert_tokens_to_ids(text)
        return tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else None

    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    sot = token("<|startoftranscript|>")
    if sot is None:
        raise ModelError("tokenizer.json has no <|startoftranscript|> token; is this a Whisper tokenizer?")
    multilingual = whisper.multilingual_vocabulary(dims["vocab_size"])
    fields = dict(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=dims["max_target_positions"],
        is_multilingual=multilingual,
        no_timestamps_token_id=token("<|notimestamps|>"),
        prev_sot_token_id=token("<|startofprev|>"),
        suppress_tokens=[int(t) for t in ct2_config.get("suppress_ids", [])],
        begin_suppress_tokens=[int(t) for t in ct2_config.get("suppress_ids_begin", [])],
        return_timestamps=False,
        max_initial_timestamp_index=50,
    )
    if ct2_config.get("alignment_heads"):
        fields["alignment_heads"] = [list(map(int, pair)) for pair in ct2_config["alignment_heads"]]
    if multilingual:
        fields["lang_to_id"] = {f"<|{code}|>": tid for code in LANGUAGES if (tid := token(f"<|{code}|>")) is not None}
        fields["task_to_id"] = {task: tid for task in ("transcribe", "translate") if (tid := token(f"<|{task}|>")) is not None}
    # a fresh GenerationConfig: one derived from the model config would drop these on reload
    return GenerationConfig(**fields)


def import_ct2(source: str | Path, out: str | Path, *, dtype: str = "float32") -> Path:
    """Turn a CTranslate2 (faster-whisper) Whisper directory into a `save_pretrained` directory:
    weights (as `dtype`), tokenizer, feature extractor and a generation config carrying the CT2
    config's suppressed tokens, alignment heads and language settings."""
    from transformers import (
        WhisperConfig,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise ModelError(f"{source}: not a directory; give a faster-whisper (CTranslate2) model directory")
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    config_path = source / "config.json"
    try:
        ct2_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except ValueError as exc:
        raise ModelError(f"{config_path}: not valid JSON ({exc})") from None
    model_file = source / "model.bin"
    state, dims = whisper_state_dict(read_ct2(model_file), model_file)
    tokenizer = _tokenizer(source)
    if len(tokenizer) > dims["vocab_size"]:
        raise ModelError(f"{source}: tokenizer.json has {len(tokenizer)} tokens but the model only {dims['vocab_size']}")

    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    generation = _generation_config(tokenizer, ct2_config, dims)
    config = WhisperConfig(
        **dims,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=generation.decoder_start_token_id,
        # decoding settings live in the generation config alone (transformers warns at both)
        suppress_tokens=None,
        begin_suppress_tokens=None,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tensors = {name: torch.from_numpy(np.array(array, dtype=np.float32)) for name, array in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [name for name in missing if name != "proj_out.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelError(f"{source}: the weights do not fit Whisper (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    model.to(DTYPES[dtype])
    model.generation_config = generation
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    WhisperProcessor(feature_extractor=_feature_extractor(source, dims["num_mel_bins"]), tokenizer=tokenizer).save_pretrained(out)
    return out


def export_ct2(source: str | Path, out: str | Path, *, quantization: str = "float32", force: bool = False) -> Path:
    """A `save_pretrained` Whisper as a faster-whisper model, through CTranslate2's own converter."""
    model_dir = Path(source)
    if detect_family(str(model_dir)) != "whisper":
        raise ModelError(f"{model_dir}: not a saved Whisper model (no config.json with model_type whisper); "
                         "only Whisper exports to faster-whisper")
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        raise ModelError("exporting to faster-whisper needs ctranslate2: pip install 'audiorl[faster-whisper]'") from None
    if quantization not in QUANTIZATIONS:
        raise ModelError(f"--quantization {quantization!r}: choose one of {list(QUANTIZATIONS)}")
    out = Path(out)
    copy = [name for name in _COPIED_FILES if (model_dir / name).is_file()]
    if "tokenizer.json" not in copy:
        raise ModelError(f"{model_dir}: no tokenizer.json to copy; faster-whisper needs it beside the model")
    if out.exists() and any(out.iterdir()) and not force:
        raise ModelError(f"{out}: exists and is not empty; pass --force to overwrite it")
    try:
        TransformersConverter(str(model_dir), copy_files=copy, load_as_float16=quantization == "float16").convert(
            str(out), quantization=quantization, force=True
        )
    except (ValueError, OSError, NotImplementedError) as exc:
        raise ModelError(f"{model_dir}: CTranslate2 could not convert it ({exc})") from None
    if not (out / "preprocessor_config.json").is_file():
        # faster-whisper reads the mel bins (80, or 128 for large-v3) and window from this file;
        # transformers 5 keeps them inside processor_config.json instead
        from transformers import WhisperFeatureExtractor

        WhisperFeatureExtractor.from_pretrained(str(model_dir)).to_json_file(str(out / "preprocessor_config.json"))
    return out

