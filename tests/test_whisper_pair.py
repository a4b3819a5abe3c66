"""The pair family on the real Whisper tiny.en, its default: the frozen layers' cache equals running
those layers, the cached and the per-batch paths give the same logits, and `train_model3mapd.py
--fold 0 --n_folds 2` with no backbone flag trains a tiny fold on tiny.en whose checkpoint loads
weights-only and predicts; model7whisper fine-tunes the whole encoder (the GPU recipe) and
`--backbone scratch` still trains the small encoder from scratch. One demo set and one converted
backbone for the whole module."""
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_script
from readaloud.config import ConfigError, apply_overrides, backbone_input_settings
from readaloud.features import FeatureParams
from readaloud.members.pair.encoder import build_network, load_pretrained_encoder
from readaloud.members.pair.frozen import FrozenCache, FrozenPairDataset, frozen_cache_usable
from readaloud.members.pair.neural import pair_dataset, predict_logits
from readaloud.members.pair.pair import PairClassifier
from readaloud.prep.dataset import Categories, PairDataset
from readaloud.prep.prepare import ensure_clip_features, ensure_references
from readaloud.text import Vocab, normalise_text
from readaloud.variants import variant_config

FP16_TOL = 2e-3  # relative to the largest magnitude: a float16 mantissa is 10 bits


@pytest.fixture(scope="module")
def trained(tmp_path_factory, root):
    """A converted tiny.en (READALOUD_BACKBONES), a tiny demo set and one model3mapd fold trained with
    its defaults, no backbone flag (1 epoch, 2 updates)."""
    base = tmp_path_factory.mktemp("whisper_pair")
    env = {"READALOUD_BACKBONES": str(base / "backbones")}
    data, assets, tts = base / "data", base / "assets", base / "tts"
    run_script(root, "make_demo_data.py", "--out", data, "--n-train", 24, "--n-test", 6, "--seed", 5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("READALOUD_BACKBONES", env["READALOUD_BACKBONES"])
        run_script(root, "train_model3mapd.py", "--fold", 0, "--n_folds", 2, "--data", data, "--assets", assets,
                   "--tts_dir", tts, "--epochs", 1, "--max_updates", 2, env=env)
        yield {"data": data, "assets": assets, "tts": tts, "base": base, "env": env}


@pytest.fixture(scope="module")
def stores(trained):
    data, tts = trained["data"], trained["tts"]
    meta = pd.read_csv(data / "train_metadata.csv").merge(pd.read_csv(data / "train_labels.csv"), on="filename")
    cfg = variant_config("model3mapd")
    refs = ensure_references(tts, cfg.tts, meta["expected_text"].unique(), FeatureParams(), progress=False)
    clips, _ = ensure_clip_features(data, meta["filename"].tolist(), FeatureParams(), progress=False)
    return meta, clips, refs


def fresh_model(cfg, meta, vocab):
    torch.manual_seed(0)
    cats = Categories.from_meta(meta)
    return build_network(PairClassifier, cfg.model, len(cats.tasks), len(cats.grades), len(vocab)).eval(), cats


def test_backbone_settings_follow_a_real_whisper():
    cfg = variant_config("model1mean", {"backbone": "whisper-tiny.en"})
    assert cfg.model.position_pool == 1 and variant_config("model1mean").model.position_pool == 1
    assert variant_config("model1mean", {"backbone": "scratch"}).model.position_pool == 2
    assert variant_config("model1mean", {"backbone": "whisper-tiny.en", "position_pool": 2}).model.position_pool == 2
    assert backbone_input_settings("some/hub-id") == {"position_pool": 1}
    with pytest.raises(ConfigError, match="freeze_layers"):
        apply_overrides(cfg, {"freeze_layers": -1})
    with pytest.raises(ValueError, match="position_pool 1"):
        build_network(PairClassifier, apply_overrides(cfg, {"position_pool": 2}).model, 1, 1, 4)
    assert frozen_cache_usable(variant_config("model3mapd"))
    assert not frozen_cache_usable(variant_config("model3mapd", {"spec_time_masks": 2}))


def test_cache_equals_running_the_frozen_layers(trained, stores):
    meta, clips, refs = stores
    cfg = variant_config("model3mapd")
    vocab = Vocab.build(meta["expected_text"], cfg.model.ctc_unit)
    model, _ = fresh_model(cfg, meta, vocab)
    for name, p in model.named_parameters():  # stem and the lowest 3 layers frozen, the top one trains
        assert p.requires_grad == (name.startswith(("encoder.layers.3.", "encoder.layer_norm")) or
                                   not name.startswith("encoder.")), name
    cache = FrozenCache(model, clips, refs, cfg.model.pause_frames)
    cache.ensure(meta["expected_text"], meta["filename"], progress=False)  # made by the fold already
    assert len(cache.clip_store) == len(meta) and len(cache.ref_store) == meta["expected_text"].nunique()
    halves = [(cache.ref_store, cache.reference_half, t) for t in meta["expected_text"].unique()[:3]]
    halves += [(cache.clip_store, cache.response_half, f) for f in meta["filename"][:4]]
    for store, half, key in halves:
        feats = torch.from_numpy(half(key))[None]
        with torch.no_grad():
            direct, _ = model.encode_lower(feats, torch.ones(feats.shape[:2], dtype=torch.bool))
        cached = torch.from_numpy(store.get(normalise_text(key) if store is cache.ref_store else key).astype(np.float32))
        assert cached.shape == direct[0].shape == (feats.shape[1] // 2, 384)
        scale = float(direct.abs().max())
        assert float((cached - direct[0]).abs().max()) <= FP16_TOL * scale, key


def test_cached_path_gives_the_logits_of_the_per_batch_path(trained, stores):
    meta, clips, refs = stores
    # the encoder's two paths; the fold ear's inputs (tests/test_pair_ear.py) are the same on both, and without
    # them a fresh network's logits differ from item to item (with them its last layers start at 0)
    cfg = variant_config("model3mapd", {"ear_evidence": False})
    vocab = Vocab.build(meta["expected_text"], cfg.model.ctc_unit)
    model, cats = fresh_model(cfg, meta, vocab)
    cached = pair_dataset(meta, clips, refs, vocab, cats, model, cfg, progress=False)
    per_batch = pair_dataset(meta, clips, refs, vocab, cats, model, cfg, cache_frozen=False)
    assert isinstance(cached, FrozenPairDataset) and type(per_batch) is PairDataset
    assert (cached.lengths == per_batch.lengths).all()
    a = predict_logits(model, cached, torch.device("cpu"), 3000)
    b = predict_logits(model, per_batch, torch.device("cpu"), 3000)
    assert np.abs(a - b).max() < 0.02, np.abs(a - b).max()
    assert np.std(b) > 1e-3  # the items' logits differ: the comparison is not between constants
    # the frozen part sees each half alone: changing the response leaves the reference's outputs alone
    item = per_batch.item(0)
    batch = {k: torch.as_tensor(v)[None] for k, v in item.items()
             if k in ("feats",)} | {"frame_mask": torch.ones(1, item["feats"].shape[0], dtype=torch.bool),
                                   "resp_start": torch.tensor([item["resp_start_pos"]]),
                                   "resp_positions": torch.tensor([item["resp_pos"]])}
    h1, _ = model.frozen_halves(batch)
    batch["feats"] = batch["feats"].clone()
    batch["feats"][0, item["resp_start"]:] += 0.5
    h2, _ = model.frozen_halves(batch)
    start = item["resp_start_pos"]
    assert torch.equal(h1[0, :start], h2[0, :start]) and not torch.equal(h1[0, start:], h2[0, start:])


def test_fold_trained_on_tiny_en_loads_weights_only_and_predicts(trained):
    from readaloud.pipeline.inference import load_fold_model, test_inputs
    path = trained["assets"] / "model3mapd_0.pth"
    fm = load_fold_model(path, torch.device("cpu"))  # safe_load: torch.load(weights_only=True)
    assert fm.predictor.cfg.model.backbone == "whisper-tiny.en" and fm.predictor.cfg.model.freeze_layers == 3
    # the frozen layers left training exactly as the backbone has them; the top layer moved
    pretrained = load_pretrained_encoder("whisper-tiny.en").state_dict()
    trained_encoder = fm.model.encoder.state_dict()
    for name in ("conv1.weight", "layers.0.fc1.weight", "layers.2.self_attn.q_proj.weight"):
        assert torch.equal(trained_encoder[name], pretrained[name]), name
    assert not torch.equal(trained_encoder["layers.3.fc1.weight"], pretrained["layers.3.fc1.weight"])
    fmt = pd.read_csv(trained["data"] / "submission_format.csv")
    inputs, _, problems = test_inputs(trained["data"], trained["tts"], fmt, torch.device("cpu"), False)
    logits = fm.predictor.predict(inputs)
    assert len(logits) == len(fmt) and not problems
    assert np.isfinite(logits).all() and np.std(logits) > 0


def test_every_pair_variant_reads_a_pretrained_whisper_unless_told_scratch(tmp_path):
    from readaloud.variants import VARIANTS, scratch_variants
    pair = [n for n in VARIANTS if variant_config(n).model.arch in ("pair", "encdec")]
    assert {"model1mean", "model2attn", "model3mapd", "model4encdec", "model7whisper"} <= set(pair)
    for name in pair:
        cfg = variant_config(name)
        assert cfg.model.backbone == "whisper-tiny.en" and cfg.model.position_pool == 1, name
    for name in scratch_variants():
        cfg = variant_config(name, {"backbone": "scratch"})
        assert cfg.model.backbone == "" and cfg.model.freeze_layers == 0 and cfg.model.position_pool == 2, name
        assert cfg.model.d_model == 128 and cfg.optim.lr == 1e-3, name
    # a folder pretrain.py wrote: the from-scratch settings, on that encoder, at its pooling
    folder = tmp_path / "pretrained_encoder"
    folder.mkdir()
    (folder / "pretraining.json").write_text('{"settings": {"model": {"position_pool": 2, "n_mels": 80}}}')
    cfg = variant_config("model1mean", {"backbone": str(folder)})
    assert cfg.model.backbone == str(folder) and cfg.model.freeze_layers == 0 and cfg.data.aug_prob == 0.5
    with pytest.raises(ConfigError, match="model8decoder reads a pretrained Whisper.*model1mean"):
        variant_config("model8decoder", {"backbone": "scratch"})
    assert variant_config("model7whisper").model.freeze_layers == 0  # the GPU recipe: the whole encoder trains


def test_the_gpu_recipe_and_the_scratch_option_train_a_tiny_fold(trained, root):
    from readaloud.pipeline.inference import load_fold_model
    data, tts, env = trained["data"], trained["tts"], trained["env"]
    full, scratch = trained["base"] / "full", trained["base"] / "scratch"
    common = ["--fold", 0, "--n_folds", 2, "--data", data, "--tts_dir", tts, "--epochs", 1, "--max_updates", 2]
    run_script(root, "train_model7whisper.py", *common, "--assets", full, env=env)
    run_script(root, "train_model3mapd.py", *common, "--assets", scratch, "--backbone", "scratch", env=env)
    fm = load_fold_model(full / "model7whisper_0.pth", torch.device("cpu"))
    pretrained = load_pretrained_encoder("whisper-tiny.en").state_dict()
    moved = fm.model.encoder.state_dict()
    for name in ("conv1.weight", "layers.0.fc1.weight", "layers.3.fc1.weight"):  # nothing frozen
        assert not torch.equal(moved[name], pretrained[name]), name
    fm = load_fold_model(scratch / "model3mapd_0.pth", torch.device("cpu"))
    cfg = fm.predictor.cfg
    assert cfg.model.backbone == "" and cfg.model.freeze_layers == 0 and fm.model.encoder.config.d_model == 128
