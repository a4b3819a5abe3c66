"""The teacher-forced Whisper decoder member on the real tiny.en (model8decoder): its log p of an
espeak sentence equals a direct WhisperForConditionalGeneration forward, a fold killed after its
first evaluation resumes from its checkpoint without encoding a clip again, and the finished
checkpoint loads weights-only and predicts. One demo set and one converted backbone for the module."""
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import WhisperForConditionalGeneration

from conftest import run_script
from readaloud.audio import load_audio
from readaloud.config import ConfigError
from readaloud.features import whisper_window_s
from readaloud.members.decoder.decoder import DecoderDataset, WhisperDecoderClassifier
from readaloud.whisper.encoding import encode_window
from readaloud.members.registry import build_model
from readaloud.prep.dataset import Categories
from readaloud.variants import variant_config
from readaloud.whisper.backbones import transformers_dir

LOGP_TOL = 0.05  # nats per token: the cache holds float16 (10-bit mantissa) encoder outputs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, root):
    """A converted tiny.en (READALOUD_BACKBONES), a tiny demo set, and fold 0 of 2 of model8decoder
    killed after its first evaluation, then resumed to its end (2 epochs)."""
    base = tmp_path_factory.mktemp("whisper_decoder")
    env = {"READALOUD_BACKBONES": str(base / "backbones")}
    data, assets, tts = base / "data", base / "assets", base / "tts"
    run_script(root, "make_demo_data.py", "--out", data, "--n-train", 12, "--n-test", 4, "--seed", 5)
    args = ["train_model8decoder.py", "--fold", 0, "--n_folds", 2, "--data", data, "--assets", assets,
            "--tts_dir", tts, "--epochs", 2, "--threads", 2]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("READALOUD_BACKBONES", env["READALOUD_BACKBONES"])
        killed = run_script(root, "tests/fault_injection.py", "die_after_eval", 1, *args, env=env, ok=False)
        resumed = run_script(root, *args, env=env)
        yield {"data": data, "assets": assets, "tts": tts, "killed": killed, "resumed": resumed}


def test_fold_resumes_and_reuses_the_encoder_cache(trained):
    killed, resumed = trained["killed"], trained["resumed"]
    assert killed.returncode == 137, killed.stderr[-2000:]
    encoded = [int(n) for n in re.findall(r"Whisper encoder: (\d+) clips encoded", killed.stderr)]
    assert sum(encoded) == 12, encoded  # every training clip, once (fold 0's training and held-out parts)
    assert "resumed from" in resumed.stderr and "at epoch 1" in resumed.stderr
    assert "clips encoded" not in resumed.stderr, "the second run computes no encoding"
    metrics = pd.read_csv(trained["assets"] / "runs" / "model8decoder_0" / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]
    assert np.isfinite(metrics["train_ctc"]).all() and (metrics["train_ctc"] > 0).any()


def test_checkpoint_loads_weights_only_and_predicts(trained):
    from readaloud.pipeline.inference import load_fold_model, test_inputs
    fm = load_fold_model(trained["assets"] / "model8decoder_0.pth", torch.device("cpu"))  # weights_only
    model = fm.predictor.model
    assert isinstance(model, WhisperDecoderClassifier) and model.prompt == [50257, 50362]  # <|sot|><|notimestamps|>
    pretrained = WhisperForConditionalGeneration.from_pretrained(transformers_dir("whisper-tiny.en")).model
    assert torch.equal(model.encoder.conv1.weight, pretrained.encoder.conv1.weight), "the encoder is frozen"
    assert torch.equal(model.decoder.embed_tokens.weight, pretrained.decoder.embed_tokens.weight)
    assert not torch.equal(model.decoder.layers[0].fc1.weight, pretrained.decoder.layers[0].fc1.weight)
    fmt = pd.read_csv(trained["data"] / "submission_format.csv")
    inputs, _, problems = test_inputs(trained["data"], trained["tts"], fmt, torch.device("cpu"), False)
    logits = fm.predictor.predict(inputs)
    assert len(logits) == len(fmt) and not problems
    assert np.isfinite(logits).all() and np.std(logits) > 0


def test_cached_encoder_path_equals_a_direct_whisper_forward(trained, tmp_path):
    data = trained["data"]
    meta = pd.read_csv(data / "train_metadata.csv").merge(pd.read_csv(data / "train_labels.csv"), on="filename")
    meta = meta.iloc[:2]
    cfg = variant_config("model8decoder", {"memory_margin_s": -1.0})   # every position of the 10 s window
    model = build_model(cfg.model, 3, 4, 8).eval()
    ds = DecoderDataset(meta, data, model, cfg, Categories.from_meta(meta), torch.device("cpu"), progress=False)
    assert ds.lengths.tolist() == [500, 500]   # the demo's clips are shorter than 10 s
    with torch.no_grad():
        out = model(ds.collate([ds.item(0), ds.item(1)]))
    direct_model = WhisperForConditionalGeneration.from_pretrained(transformers_dir("whisper-tiny.en")).eval()
    for b, row in meta.iterrows():
        text, words = model.expected_tokens(row["expected_text"])
        assert model.tokenizer.decode(text).startswith(" " + row["expected_text"].split()[0][:1].upper())
        assert model.tokenizer.decode(text).endswith(".") and words[-1] == -1
        mel = ds.cache.window(load_audio(data / row["filename"]))
        ids = torch.tensor([model.prompt + text])
        assert mel.shape[1] == 1000
        with torch.no_grad():
            encoded = encode_window(direct_model.model.encoder, torch.from_numpy(mel)[None])
            logits = direct_model(encoder_outputs=(encoded,), decoder_input_ids=ids).logits
        lp = torch.log_softmax(logits[0, len(model.prompt) - 1:].float(), -1)
        direct = lp.gather(-1, torch.tensor(text + [model.eot])[:, None]).squeeze(-1)
        cached = out["token_log_probs"][b, : len(text) + 1]
        assert float((cached - direct).abs().max()) < LOGP_TOL, (cached, direct)
        assert float(direct.std()) > 0.1  # the tokens' log p differ: not a comparison of constants


def test_a_shorter_window_is_its_own_cache_of_the_clip_s_window(trained):
    """--decoder_window_s 2: each clip is encoded in the smallest multiple of 2 s that holds it (so
    its positions are that window's, fewer than the 10 s window's), into a cache of its own; the
    default's cache and numbers are untouched."""
    data = trained["data"]
    meta = pd.read_csv(data / "train_metadata.csv").merge(pd.read_csv(data / "train_labels.csv"), on="filename")
    meta = meta.iloc[:3]
    sets = {}
    for window in (10.0, 2.0):
        cfg = variant_config("model8decoder", {"memory_margin_s": -1.0, "decoder_window_s": window})
        model = build_model(cfg.model, 3, 4, 8).eval()
        sets[window] = DecoderDataset(meta, data, model, cfg, Categories.from_meta(meta), torch.device("cpu"),
                                      progress=False)
    long, short = sets[10.0], sets[2.0]
    assert long.cache.store.data_path != short.cache.store.data_path
    assert long.lengths.tolist() == [500] * 3
    for k, name in enumerate(meta["filename"]):
        seconds = load_audio(data / name).size / 16000
        assert short.lengths[k] == whisper_window_s(int(seconds * 16000), 2.0) * 50 < 500
        assert short.lengths[k] >= seconds * 50   # the window holds the whole clip
    first = meta["filename"].iloc[0]
    assert not np.allclose(short.cache.get(first)[:50], long.cache.get(first)[:50], atol=1e-2), \
        "attention over a shorter window gives other encodings, not a slice of the 10 s ones"


def test_window_encoder_equals_whispers_own_on_30_s_and_windows_grow_by_10_s():
    encoder = WhisperForConditionalGeneration.from_pretrained(transformers_dir("whisper-tiny.en")).model.encoder.eval()
    mel = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = encode_window(encoder, mel), encoder(mel).last_hidden_state
        short = encode_window(encoder, mel[:, :, :1000])
    assert ours.shape == theirs.shape == (2, 1500, 384) and short.shape == (2, 500, 384)
    assert float((ours - theirs).abs().max()) < 1e-4
    assert float((short - ours[:, :500]).abs().max()) > 0.01   # attention over the window: not a slice
    sr = 16000
    assert [whisper_window_s(int(s * sr), 10.0) for s in (0.5, 10.0, 10.7, 25, 31)] == [10, 10, 20, 30, 30]
    assert whisper_window_s(sr, 30.0) == 30 and whisper_window_s(sr, 0) == 30


def test_the_frozen_encoder_runs_on_ctranslate2_with_the_same_numbers(trained, tmp_path):
    """Default (auto): a named backbone's windows go through CTranslate2 at float32, which computes
    what the transformers encoder computes from the same weights; the two engines cache apart, and
    asking for CTranslate2 without a CTranslate2 folder is a config error."""
    from readaloud.members.decoder.decoder import make_window_encoder
    from readaloud.whisper.encoding import Ct2WindowEncoder, TorchWindowEncoder
    data = trained["data"]
    meta = pd.read_csv(data / "train_metadata.csv").merge(pd.read_csv(data / "train_labels.csv"), on="filename")
    meta = meta.iloc[:3]
    cats = Categories.from_meta(meta)
    datasets = {}
    for engine in ("auto", "torch"):
        cfg = variant_config("model8decoder", {"decoder_encoder": engine})
        model = build_model(cfg.model, 3, 4, 8).eval()
        datasets[engine] = DecoderDataset(meta, data, model, cfg, cats, torch.device("cpu"), progress=False)
    ct2, torch_engine = datasets["auto"].cache.encoder, datasets["torch"].cache.encoder
    assert isinstance(ct2, Ct2WindowEncoder) and isinstance(torch_engine, TorchWindowEncoder)
    assert ct2.key.startswith("ct2_float32_") and ct2.key != torch_engine.key
    assert datasets["auto"].cache.store.data_path != datasets["torch"].cache.store.data_path
    mel = datasets["auto"].cache.window(load_audio(data / meta["filename"].iloc[0]))[None]
    a, b = ct2(mel), torch_engine(mel)
    assert a.shape == b.shape == (1, 500, 384) and a.dtype == np.float32
    assert float(np.abs(a - b).max()) < 1e-2 * float(np.abs(b).max()), "same weights, same encoder"
    for f in meta["filename"]:
        x, y = datasets["auto"].cache.get(f).astype(np.float32), datasets["torch"].cache.get(f).astype(np.float32)
        assert x.shape == y.shape and float(np.abs(x - y).max()) < 1e-2 * float(np.abs(y).max()), f
    hub = variant_config("model8decoder", {"decoder_encoder": "ctranslate2", "backbone": "openai/whisper-tiny.en"})
    with pytest.raises(ConfigError, match="no CTranslate2 folder"):
        make_window_encoder(hub.model, torch.device("cpu"), lambda: None)
    with pytest.raises(ConfigError, match="decoder_encoder"):
        variant_config("model8decoder", {"decoder_encoder": "onnx"})
    int8 = make_window_encoder(variant_config("model8decoder", {"decoder_encoder_compute": "int8"}).model,
                               torch.device("cpu"), lambda: None)
    assert int8.key.startswith("ct2_int8_") and int8.key != ct2.key, "another compute type, another cache"
    c = int8(mel)
    assert c.shape == a.shape and 0 < float(np.abs(c - a).max()) < 0.5 * float(np.abs(a).max())
    with pytest.raises(ConfigError, match="decoder_encoder_compute"):
        variant_config("model8decoder", {"decoder_encoder_compute": "int4"})


def test_config_errors_and_a_multilingual_backbone():
    with pytest.raises(ConfigError, match="backbone"):
        build_model(variant_config("model8decoder", {"backbone": ""}).model, 3, 4, 8)
    with pytest.raises(ConfigError, match="decoder_frozen_layers"):
        variant_config("model8decoder", {"decoder_frozen_layers": -1})
    model = build_model(variant_config("model8decoder", {"backbone": "whisper-base", "decoder_frozen_layers": 6}).model,
                        3, 4, 8)
    sot, en, transcribe, no_ts = (model.tokenizer.token_to_id(t) for t in
                                  ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"))
    assert model.prompt == [sot, en, transcribe, no_ts]
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("decoder.")}
    assert trainable == {"layer_norm"}, "all 6 decoder layers and the embeddings frozen"
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_contrast_features_are_log_p_over_the_decoders_answer_to_silence(trained):
    """decoder_contrast: the head's extra evidence is each token's log p given the clip minus its log
    p given the encoding of silence, which a direct WhisperForConditionalGeneration forward on a
    silent window reproduces; the silent memory is derived, never saved."""
    from readaloud.members.decoder.decoder import N_CONTRAST_FEATURES, N_TOKEN_FEATURES, NULL_CLIP_S
    data = trained["data"]
    meta = pd.read_csv(data / "train_metadata.csv").merge(pd.read_csv(data / "train_labels.csv"), on="filename")
    meta = meta.iloc[:2]
    cfg = variant_config("model9contrast")
    assert cfg.model.decoder_contrast
    model = build_model(cfg.model, 3, 4, 8).eval()
    assert model.token_norm.mean.numel() == N_TOKEN_FEATURES + N_CONTRAST_FEATURES
    ds = DecoderDataset(meta, data, model, cfg, Categories.from_meta(meta), torch.device("cpu"), progress=False)
    batch = ds.collate([ds.item(0), ds.item(1)])
    captured = {}
    model.token_norm.register_forward_hook(lambda mod, inp, out: captured.setdefault("feats", inp[0]))
    with torch.no_grad():
        out = model(batch)
    assert np.isfinite(out["logits"].numpy()).all()
    null = model.null_memory(batch["memory"])
    assert null.shape[0] == 1 and null.shape[1] == int((NULL_CLIP_S + cfg.model.memory_margin_s) / 0.02)
    assert not any("null" in k for k in model.state_dict()), "derived from the encoder, not stored"

    direct_model = WhisperForConditionalGeneration.from_pretrained(transformers_dir("whisper-tiny.en")).eval()
    silence = np.zeros(int(NULL_CLIP_S * 16000), np.float32)
    mel = ds.cache.window(silence)
    for b, row in meta.iterrows():
        text, _ = model.expected_tokens(row["expected_text"])
        ids = torch.tensor([model.prompt + text])
        targets = torch.tensor(text + [model.eot])[:, None]
        with torch.no_grad():
            encoded = encode_window(direct_model.model.encoder, torch.from_numpy(mel)[None])[:, : null.shape[1]]
            logits = direct_model(encoder_outputs=(encoded,), decoder_input_ids=ids).logits
        silent = torch.log_softmax(logits[0, len(model.prompt) - 1:].float(), -1).gather(-1, targets).squeeze(-1)
        gain = out["token_log_probs"][b, : len(text) + 1] - silent
        feats = captured["feats"][b, N_TOKEN_FEATURES:]
        assert abs(float(feats[0]) - float(gain.mean())) < LOGP_TOL
        assert abs(float(feats[1]) - float(gain.min())) < 2 * LOGP_TOL
        assert abs(float(feats[2]) - float(gain.sum()) / 10) < LOGP_TOL
        assert float(gain.abs().max()) > 0.5   # the audio moves the tokens' log p: not a difference of equals


def test_silent_pass_decodes_each_text_of_a_batch_once_and_changes_no_number(trained):
    """decoder_contrast's silent pass depends on the tokens alone: clips of one batch that share a
    text share its silent decode, with the same log p as decoding every row, and gradients flow."""
    data = trained["data"]
    meta = pd.read_csv(data / "train_metadata.csv").merge(pd.read_csv(data / "train_labels.csv"), on="filename")
    meta = meta.iloc[:2]
    cfg = variant_config("model9contrast")
    model = build_model(cfg.model, 3, 4, 8)
    ds = DecoderDataset(meta, data, model, cfg, Categories.from_meta(meta), torch.device("cpu"), progress=False)
    batch = ds.collate([ds.item(0), ds.item(1), ds.item(0)])   # the first text twice
    k = batch["n_prompt"]
    rows_decoded = []
    decode = model.decode
    model.decode = lambda memory, mask, inputs: rows_decoded.append(len(inputs)) or decode(memory, mask, inputs)
    with torch.no_grad():
        fast = model.silent_logp(batch, k)
    assert rows_decoded == [2], "two distinct texts, two silent decodes"
    null = model.null_memory(batch["memory"]).expand(3, -1, -1)
    states = decode(null, torch.ones(null.shape[:2], dtype=torch.bool), batch["dec_inputs"])[:, k - 1:]
    with torch.no_grad():
        every_row = model.token_scores(states, batch["dec_targets"], batch["token_mask"])["logp"]
    kept = batch["token_mask"]                                  # token_scores scores the text's positions only
    assert torch.allclose(fast[kept], every_row[kept], atol=1e-5), float((fast[kept] - every_row[kept]).abs().max())
    assert torch.equal(fast[0], fast[2])
    model.train()
    model.silent_logp(batch, k).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


def test_a_fold_trains_with_text_negatives(trained, root, tmp_path):
    """--text_negatives 1 through train_model8decoder.py: the fold's training rows scored 1 gain a
    changed text each (the log says how many), the fold finishes and its config records the option."""
    data = trained["data"]
    args = ["train_model8decoder.py", "--fold", 0, "--n_folds", 2, "--data", data, "--assets", tmp_path,
            "--tts_dir", trained["tts"], "--epochs", 1, "--threads", 2, "--text_negatives", 1]
    run = run_script(root, *args, env={"READALOUD_BACKBONES": str(data.parent / "backbones")})
    from readaloud.prep.text_negatives import with_text_negatives
    meta = pd.read_csv(data / "train_metadata.csv").merge(pd.read_csv(data / "train_labels.csv"), on="filename")
    meta = meta.merge(pd.read_csv(data / "cache" / "folds_2.csv"), on="filename")
    train = meta[meta["fold"] != 0]
    expected = len(with_text_negatives(train, 1, seed=8 * 1000 + 0)) - len(train)   # the fold's seed
    assert 0 < expected <= int((train["score"] == 1).sum())
    assert f"fold 0: {expected} training rows with changed texts" in run.stderr, run.stderr[-2000:]
    summary = json.loads((tmp_path / "model8decoder_0.json").read_text())
    assert summary["config"]["data"]["text_negatives"] == 1 and summary["n_train"] == len(train) + expected
