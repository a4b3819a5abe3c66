"""Convert a CTranslate2 Whisper folder (what faster-whisper users have on disk) into a
transformers checkpoint folder that `WhisperForConditionalGeneration.from_pretrained`,
`WhisperProcessor`, `WhisperTokenizer` and `WhisperFeatureExtractor` load offline.

The sizes come from the weights' shapes (heads from the `*/num_heads` scalars CTranslate2 stores,
else the CT2 config.json, else the known Whisper sizes); token ids from the folder's
tokenizer.json; suppressed tokens, language ids and alignment heads from its config.json.
CTranslate2 fuses q|k|v (self-attention) and k|v (cross-attention) into one linear: they are
split here. transformers' k_proj has no bias; dropping the k slice of the fused bias is exact,
since q.(k + b) shifts every score of a query by the same q.b and softmax ignores that.
Quantised weights are dequantised and everything is saved as float32 safetensors.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                          WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)

from readaloud.whisper.ct2 import dequantize, read_model_bin

CONVERTER_VERSION = 1
CONVERSION_RECORD = "readaloud_conversion.json"
# Published Whisper sizes (d_model -> attention heads), used only if the file has no num_heads.
HEADS_BY_D_MODEL = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 20}
# CTranslate2's Activation enum -> transformers' activation names.
ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "swish", 3: "gelu"}
TIMESTAMP_STEP_S = 0.02
SOURCE_FILES = ("model.bin", "config.json", "tokenizer.json")


class ConversionError(ValueError):
    pass


def _layer_count(weights: dict, prefix: str) -> int:
    found = {int(m.group(1)) for name in weights for m in [re.match(rf"{prefix}/layer_(\d+)/", name)] if m}
    if not found or found != set(range(len(found))):
        raise ConversionError(f"{prefix} layers are {sorted(found)}: expected layer_0 .. layer_N")
    return len(found)


def _scalar(weights: dict, name: str):
    value = weights.get(name)
    return None if value is None else int(np.asarray(value).reshape(()))


def _heads(weights: dict, ct2_config: dict, part: str, d_model: int, source: Path) -> int:
    heads = _scalar(weights, f"{part}/num_heads") or ct2_config.get(f"{part}_num_heads") \
        or ct2_config.get("num_heads") or HEADS_BY_D_MODEL.get(d_model)
    if not heads:
        raise ConversionError(f"{source}: no {part}/num_heads in model.bin, none in config.json and "
                              f"d_model {d_model} is not a known Whisper size {sorted(HEADS_BY_D_MODEL)}")
    if d_model % heads:
        raise ConversionError(f"{source}: d_model {d_model} is not divisible by {heads} {part} heads")
    return int(heads)


def _check_architecture(weights: dict, source: Path) -> str:
    """The activation name; an error for CTranslate2 options Whisper in transformers lacks."""
    expected = {"decoder/pre_norm": 1, "decoder/scale_embeddings": 0, "decoder/alibi": 0}
    for name, value in expected.items():
        found = _scalar(weights, name)
        if found is not None and found != value:
            raise ConversionError(f"{source}: {name} = {found}, transformers' Whisper needs {value}")
    activation = _scalar(weights, "decoder/activation")
    activation = 3 if activation is None else activation
    if activation not in ACTIVATIONS:
        raise ConversionError(f"{source}: decoder/activation {activation} is not one of {ACTIVATIONS}")
    return ACTIVATIONS[activation]


def _split(value: np.ndarray, parts: int, name: str, d_model: int) -> list[np.ndarray]:
    if value.shape[0] != parts * d_model:
        raise ConversionError(f"{name} has {value.shape[0]} rows, expected {parts} x {d_model}")
    return np.split(value, parts, axis=0)


def _attention(w: dict, src: str, dst: str, d: int, fused: list[tuple[str, tuple[str, ...]]]) -> dict:
    """Map fused CT2 linears to q/k/v/out_proj; `fused` lists (ct2 linear, the parts it holds)."""
    out = {}
    for linear, parts in fused:
        weight = _split(w[f"{src}/{linear}/weight"], len(parts), f"{src}/{linear}/weight", d)
        bias = _split(w[f"{src}/{linear}/bias"], len(parts), f"{src}/{linear}/bias", d)
        for part, wt, b in zip(parts, weight, bias):
            out[f"{dst}.{part}.weight"] = wt
            if part != "k_proj":
                out[f"{dst}.{part}.bias"] = b
    return out


def _norm(w: dict, src: str, dst: str) -> dict:
    return {f"{dst}.weight": w[f"{src}/gamma"], f"{dst}.bias": w[f"{src}/beta"]}


def _linear(w: dict, src: str, dst: str) -> dict:
    return {f"{dst}.weight": w[f"{src}/weight"], f"{dst}.bias": w[f"{src}/bias"]}


def map_state_dict(w: dict, d: int, n_encoder: int, n_decoder: int) -> dict[str, np.ndarray]:
    """transformers' WhisperForConditionalGeneration names for the (float) CT2 variables."""
    sd = {"model.encoder.embed_positions.weight": w["encoder/position_encodings/encodings"],
          "model.decoder.embed_positions.weight": w["decoder/position_encodings/encodings"],
          "model.decoder.embed_tokens.weight": w["decoder/embeddings/weight"],
          "proj_out.weight": w.get("decoder/projection/weight", w["decoder/embeddings/weight"])}
    sd |= _linear(w, "encoder/conv1", "model.encoder.conv1") | _linear(w, "encoder/conv2", "model.encoder.conv2")
    sd |= _norm(w, "encoder/layer_norm", "model.encoder.layer_norm")
    sd |= _norm(w, "decoder/layer_norm", "model.decoder.layer_norm")
    for part, count in (("encoder", n_encoder), ("decoder", n_decoder)):
        for i in range(count):
            src, dst = f"{part}/layer_{i}", f"model.{part}.layers.{i}"
            sd |= _attention(w, f"{src}/self_attention", f"{dst}.self_attn", d,
                             [("linear_0", ("q_proj", "k_proj", "v_proj")), ("linear_1", ("out_proj",))])
            sd |= _norm(w, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            if part == "decoder":
                sd |= _attention(w, f"{src}/attention", f"{dst}.encoder_attn", d,
                                 [("linear_0", ("q_proj",)), ("linear_1", ("k_proj", "v_proj")),
                                  ("linear_2", ("out_proj",))])
                sd |= _norm(w, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            sd |= _linear(w, f"{src}/ffn/linear_0", f"{dst}.fc1") | _linear(w, f"{src}/ffn/linear_1", f"{dst}.fc2")
            sd |= _norm(w, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    return sd


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from exc


def special_token_ids(tokenizer_json: dict, path: Path) -> dict[str, int]:
    """{'<|startoftranscript|>': 50257, ...} for the special tokens of a tokenizer.json."""
    ids = {t["content"]: int(t["id"]) for t in tokenizer_json.get("added_tokens", [])}
    for needed in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if needed not in ids:
            raise ConversionError(f"{path}: the token {needed} is missing: not a Whisper tokenizer")
    return ids


def _add_timestamp_tokens(tokenizer_json: dict, vocab_size: int, path: Path) -> dict:
    """Timestamp tokens <|0.00|>, <|0.02|>, ... for the ids after <|notimestamps|> (as the hub's
    Whisper tokenizers have them), if the file stops at <|notimestamps|> (tiny.en's does)."""
    added = tokenizer_json["added_tokens"]
    last = max(t["id"] for t in added)
    if last + 1 >= vocab_size:
        return tokenizer_json
    begin = special_token_ids(tokenizer_json, path)["<|notimestamps|>"] + 1
    if last + 1 != begin:
        raise ConversionError(f"{path}: added tokens end at id {last}, neither at <|notimestamps|> "
                              f"({begin - 1}) nor at the vocabulary's end ({vocab_size - 1})")
    for token_id in range(begin, vocab_size):
        added.append({"id": token_id, "content": f"<|{(token_id - begin) * TIMESTAMP_STEP_S:.2f}|>",
                      "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
                      "special": False})
    return tokenizer_json


def _languages(tokens: dict[str, int], ct2_config: dict) -> dict[str, int]:
    """{'<|en|>': id, ...}: the CT2 config's lang_ids if given, else the tokens between
    <|startoftranscript|> and <|translate|>."""
    by_id = {i: t for t, i in tokens.items()}
    if ct2_config.get("lang_ids"):
        return {by_id[i]: i for i in ct2_config["lang_ids"] if i in by_id}
    sot, end = tokens["<|startoftranscript|>"], tokens.get("<|translate|>", -1)
    return {t: i for t, i in tokens.items() if sot < i < end}


def english_prompt(tokens: dict[str, int], multilingual: bool) -> list[int]:
    """Token ids that start an English transcription without timestamps."""
    prompt = [tokens["<|startoftranscript|>"]]
    if multilingual:
        prompt += [tokens["<|en|>"], tokens["<|transcribe|>"]]
    return prompt + [tokens["<|notimestamps|>"]]


def build_configs(weights: dict, ct2_config: dict, tokens: dict[str, int], source: Path
                  ) -> tuple[WhisperConfig, GenerationConfig]:
    """Model and generation configs from the weights' shapes, the CT2 config and the token ids."""
    vocab_size, d_model = weights["decoder/embeddings/weight"].shape
    n_mels = weights["encoder/conv1/weight"].shape[1]
    eot, sot = tokens["<|endoftext|>"], tokens["<|startoftranscript|>"]
    multilingual = vocab_size >= 51865  # Whisper's own rule: English-only models have 51864 tokens
    suppress = [int(i) for i in ct2_config.get("suppress_ids", [])]
    begin_suppress = [int(i) for i in ct2_config.get("suppress_ids_begin", [220, eot])]
    projection = weights.get("decoder/projection/weight")
    tied = projection is None or projection is weights["decoder/embeddings/weight"] \
        or np.array_equal(projection, weights["decoder/embeddings/weight"])
    config = WhisperConfig(
        vocab_size=int(vocab_size), num_mel_bins=int(n_mels), d_model=int(d_model),
        encoder_layers=_layer_count(weights, "encoder"), decoder_layers=_layer_count(weights, "decoder"),
        encoder_attention_heads=_heads(weights, ct2_config, "encoder", d_model, source),
        decoder_attention_heads=_heads(weights, ct2_config, "decoder", d_model, source),
        encoder_ffn_dim=int(weights["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(weights["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(weights["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(weights["decoder/position_encodings/encodings"].shape[0]),
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot,
        suppress_tokens=None, begin_suppress_tokens=None,  # generation settings: generation_config.json
        activation_function=_check_architecture(weights, source), tie_word_embeddings=bool(tied))
    config.dtype = torch.float32
    languages = _languages(tokens, ct2_config)
    tasks = {task: tokens[f"<|{task}|>"] for task in ("transcribe", "translate") if f"<|{task}|>" in tokens}
    generation = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        max_length=config.max_target_positions, suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress, no_timestamps_token_id=tokens["<|notimestamps|>"],
        prev_sot_token_id=tokens.get("<|startofprev|>"), is_multilingual=multilingual,
        lang_to_id=languages if multilingual else {}, task_to_id=tasks if multilingual else {},
        alignment_heads=[list(map(int, h)) for h in ct2_config.get("alignment_heads", [])],
        max_initial_timestamp_index=50, return_timestamps=False)
    generation.english_prompt_ids = english_prompt(tokens, multilingual)
    return config, generation


def source_fingerprint(source: Path) -> dict:
    """What decides whether a converted folder is still current: source files and converter."""
    files = {n: [(source / n).stat().st_size, (source / n).stat().st_mtime_ns]
             for n in SOURCE_FILES if (source / n).is_file()}
    return {"converter_version": CONVERTER_VERSION, "source": str(source.resolve()), "files": files}


def is_current(target: Path, fingerprint: dict) -> bool:
    record = _read_json(target / CONVERSION_RECORD) if target.is_dir() else {}
    needed = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "preprocessor_config.json")
    return record.get("fingerprint") == fingerprint and all((target / n).is_file() for n in needed)


def replace_folder(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; a stale target is moved aside first, then removed."""
    if target.exists():
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not target.exists():  # another process renamed its copy in first: keep theirs
            raise


def _load_strict(config: WhisperConfig, state: dict[str, np.ndarray]) -> WhisperForConditionalGeneration:
    """The model with exactly these weights: a missing or unexpected name is an error."""
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ConversionError(f"weight names do not match WhisperForConditionalGeneration: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(tensors, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _write_processor(tmp: Path, tokenizer_json: dict, tokens: dict[str, int], config: WhisperConfig) -> None:
    """Tokenizer (every <|...|> control token special, as on the hub) and feature extractor."""
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    eot = "<|endoftext|>"
    specials = [t for t, i in sorted(tokens.items(), key=lambda x: x[1])
                if t != eot and i < tokens["<|notimestamps|>"] + 1 and t.startswith("<|")]
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "WhisperTokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
        "pad_token": eot, "extra_special_tokens": specials, "model_max_length": 1024}), encoding="utf-8")
    tokenizer = WhisperTokenizer.from_pretrained(tmp)
    if tokenizer.all_special_ids[-1] != tokens["<|notimestamps|>"]:
        raise ConversionError(f"the tokenizer's last special token is {tokenizer.all_special_ids[-1]}, "
                              f"not <|notimestamps|>: timestamps would decode wrongly")
    hop, sample_rate = 160, 16000
    features = WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, sampling_rate=sample_rate, hop_length=hop, n_fft=400,
        chunk_length=config.max_source_positions * 2 * hop // sample_rate)
    WhisperProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(tmp)
    features.save_pretrained(tmp)  # preprocessor_config.json too, for loaders that look for it


def convert_ct2_folder(source: str | Path, target: str | Path, force: bool = False) -> Path:
    """Convert once: a target made from the same source files by this converter is kept as is.

    Written to a temporary folder beside `target` and renamed into place, so an interrupted
    conversion never leaves a half-written checkpoint.
    """
    source, target = Path(source), Path(target)
    if not (source / "model.bin").is_file():
        raise FileNotFoundError(f"{source}: no model.bin; not a CTranslate2 model folder")
    if not (source / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{source}: no tokenizer.json; the transformers tokenizer is made from "
                                f"it (re-export the model with ct2-transformers-converter --copy_files tokenizer.json)")
    fingerprint = source_fingerprint(source)
    if not force and is_current(target, fingerprint):
        return target
    started = time.perf_counter()
    print(f"converting the CTranslate2 Whisper {source} -> {target}", file=sys.stderr, flush=True)
    model_bin = read_model_bin(source / "model.bin")
    if model_bin.spec != "WhisperSpec":
        raise ConversionError(f"{source / 'model.bin'}: spec {model_bin.spec!r}, not WhisperSpec")
    weights = dequantize(model_bin.variables, source / "model.bin")
    ct2_config = _read_json(source / "config.json")
    tokenizer_json = _read_json(source / "tokenizer.json")
    tokens = special_token_ids(tokenizer_json, source / "tokenizer.json")
    config, generation = build_configs(weights, ct2_config, tokens, source)
    try:
        state = map_state_dict(weights, config.d_model, config.encoder_layers, config.decoder_layers)
    except KeyError as exc:
        raise ConversionError(f"{source / 'model.bin'}: variable {exc.args[0]!r} is missing") from exc
    model = _load_strict(config, state)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        generation.save_pretrained(tmp)
        _write_processor(tmp, _add_timestamp_tokens(tokenizer_json, config.vocab_size, source / "tokenizer.json"),
                         tokens, config)
        record = {"fingerprint": fingerprint, "spec": model_bin.spec, "spec_revision": model_bin.revision,
                  "binary_version": model_bin.binary_version, "aliases": model_bin.aliases,
                  "stored_dtypes": sorted({str(v.dtype) for v in model_bin.variables.values()}),
                  "english_prompt_ids": generation.english_prompt_ids,
                  "seconds": round(time.perf_counter() - started, 2)}
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
        if not is_current(target, fingerprint):  # another process may have just made it
            replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
