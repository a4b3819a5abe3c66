"""Every registered variant (pair and encdec) builds, runs a tiny batch forward and backward,
and the pretrained-backbone path loads a Whisper checkpoint through from_pretrained."""
import numpy as np
import pytest
import torch

from readaloud.config import ModelConfig
from readaloud.prep.dataset import collate
from readaloud.members.pair.encoder import small_whisper_config
from readaloud.members.pair.ear import EAR_INPUTS
from readaloud.members.registry import build_model
from readaloud.variants import VARIANTS, variant_config


def tiny_items(n=3, n_mels=80, rng=np.random.default_rng(0), ear: bool = False):
    """Pair items; with `ear`, each carries the fold ear's inputs too (members/pair/ear.py)."""
    items = []
    for i in range(n):
        ref_n, pause, resp_n = 40 + 4 * i, 20, 60 + 12 * i   # multiples of 4 frames (one position)
        feats = rng.normal(size=(ref_n + pause + resp_n, n_mels)).astype(np.float32)
        items.append({"feats": feats, "floor": -1.0, "ref_n": ref_n, "resp_start": ref_n + pause,
                      "resp_n": resp_n, "ref_pos": ref_n // 4, "resp_start_pos": (ref_n + pause) // 4,
                      "resp_pos": resp_n // 4, "task": i % 3, "grade": 1, "target": np.array([1, 2, 3, 2]),
                      "label": float(i % 2)})
        if ear:
            items[-1]["ear"] = rng.normal(size=EAR_INPUTS).astype(np.float32)
    return items


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_forward_backward(variant, root):
    cfg = variant_config(variant)
    if cfg.model.arch == "gbm":
        pytest.skip("gradient boosting, no network: see tests/test_gbm.py")
    if cfg.model.arch == "whisperdec":
        pytest.skip("reads cached Whisper encodings and BPE tokens, not pairs: see tests/test_whisper_decoder.py")
    model = build_model(cfg.model, n_tasks=3, n_grades=4, vocab_size=8)
    batch = collate(tiny_items(ear=cfg.model.ear_evidence))
    batch["ctc_response"] = batch["label"] > 0.5
    out = model(batch)
    assert out["logits"].shape == (3,)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], batch["label"])
    # the trainer's rule: a model's own auxiliary loss (encdec: token CE + CTC), else the CTC loss
    aux = model.auxiliary_loss if hasattr(model, "auxiliary_loss") else model.ctc_loss
    loss = loss + aux(out, batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    heads = [p.grad for n, p in model.named_parameters() if not n.startswith("encoder.") and p.grad is not None]
    assert heads and all(torch.isfinite(g).all() for g in heads)
    assert (root / f"train_model{variant.removeprefix('model')}.py").exists(), "every variant has a script"


def test_every_script_names_a_registered_variant(root):
    for script in root.glob("train_model*.py"):
        name = "model" + script.stem.removeprefix("train_model")
        assert name in VARIANTS, f"{script.name} has no registered variant {name}"


def test_the_default_ensemble_is_on_pretrained_whisper_and_models_resolve():
    from readaloud.variants import default_variants, resolve_models
    defaults = default_variants()
    assert defaults and set(defaults) < set(VARIANTS)
    for name in defaults:  # every default member reads a pretrained Whisper, none the synthetic-speech encoder
        cfg = variant_config(name)
        assert cfg.model.backbone.startswith("whisper-") or "whisper-" in cfg.model.asr_backbones, name
    assert resolve_models(None) == resolve_models("") == defaults
    assert resolve_models("all") == list(VARIANTS)
    assert resolve_models(" model1mean, model5gbm ") == ["model1mean", "model5gbm"]
    with pytest.raises(KeyError, match="unknown model.*model9x.*registered: model1mean"):
        resolve_models("model1mean,model9x")


def test_padding_does_not_change_predictions():
    model = build_model(ModelConfig(), 3, 4, 8).eval()
    items = tiny_items(3)
    with torch.no_grad():
        together = model(collate(items))["logits"]
        alone = torch.stack([model(collate([it]))["logits"][0] for it in items])
    assert torch.allclose(together, alone, atol=1e-4)


def test_encoder_runs_on_the_real_length_not_30s():
    model = build_model(ModelConfig(), 3, 4, 8).eval()
    batch = collate(tiny_items(1))
    hidden, mask = model.encode(batch["feats"], batch["frame_mask"])
    assert hidden.shape[1] == batch["feats"].shape[1] // model.frames_per_position < 1500


MARKER = 0.0123


def save_tiny_whisper(folder) -> str:
    """A tiny WhisperModel (d_model 64, 2 layers, conv1 filled with MARKER) saved with save_pretrained."""
    from transformers import WhisperModel
    wm = WhisperModel(small_whisper_config(ModelConfig(d_model=64, encoder_layers=2, encoder_heads=2, ffn_dim=128)))
    with torch.no_grad():
        wm.encoder.conv1.weight.fill_(MARKER)
    wm.save_pretrained(folder)
    return str(folder)


def assert_encoder_is_the_tiny_whisper(encoder) -> None:
    assert encoder.config.d_model == 64 and len(encoder.layers) == 2
    assert torch.allclose(encoder.conv1.weight, torch.full_like(encoder.conv1.weight, MARKER))


def at_whisper_positions(items: list[dict]) -> list[dict]:
    """A real Whisper has no extra pooling: one position per 2 frames."""
    for it in items:
        it.update(ref_pos=it["ref_n"] // 2, resp_start_pos=it["resp_start"] // 2, resp_pos=it["resp_n"] // 2)
    return items


def test_pretrained_backbone_loads_through_from_pretrained(tmp_path):
    backbone = save_tiny_whisper(tmp_path / "tiny-whisper")
    model = build_model(ModelConfig(backbone=backbone, position_pool=1), 3, 4, 8)
    assert_encoder_is_the_tiny_whisper(model.encoder)
    items = at_whisper_positions(tiny_items(2))
    out = model(collate(items))
    assert out["logits"].shape == (2,)


def test_missing_backbone_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not a local folder"):
        build_model(ModelConfig(backbone="nobody/no-such-whisper"), 3, 4, 8)
