"""The encoder-decoder variant (model.arch = "encdec"): batching does not change a prediction
(cross-attention ignores padded encoder positions), it judges the response and not the
reference, its auxiliary loss, a checkpoint saved as training.py saves it loads through
inference, and the pretrained-backbone path."""
import json

import numpy as np
import torch

from readaloud.checkpoints import atomic_save
from readaloud.config import ModelConfig
from readaloud.prep.dataset import collate
from readaloud.members.encdec.encdec import EncDecClassifier
from readaloud.members.pair.encoder import whisper_config_dict
from readaloud.members.registry import build_model
from readaloud.text import Vocab
from readaloud.variants import variant_config
from test_models import assert_encoder_is_the_tiny_whisper, at_whisper_positions, save_tiny_whisper, tiny_items

ENCDEC = ModelConfig(arch="encdec", ctc_unit="char")


def varied_items(rng=np.random.default_rng(1)):
    """Items of different lengths with texts of different lengths (ids 1..7 of an 8-token vocab)."""
    items = tiny_items(4, rng=rng)
    for i, it in enumerate(items):
        it["target"] = rng.integers(1, 8, size=2 + 3 * i)
    return items


def warmed_up(model, items=None, steps=3):
    """A few training-mode forwards, so the running feature statistics are not the initial ones."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            batch = collate(items or varied_items())
            batch["ctc_response"] = batch["label"] > 0.5
            model(batch)
    return model.eval()


def test_encdec_is_built_for_arch_encdec():
    model = build_model(ENCDEC, 3, 4, 8)
    assert isinstance(model, EncDecClassifier)
    assert model.bos == 8 and model.pad == 9 and model.decoder.embed_tokens.num_embeddings == 10
    assert whisper_config_dict(model)["decoder_layers"] == ENCDEC.decoder_layers


def test_encdec_padding_does_not_change_predictions():
    model = warmed_up(build_model(ENCDEC, 3, 4, 8))
    items = varied_items()
    with torch.no_grad():
        together = model(collate(items))["logits"]
        alone = torch.stack([model(collate([it]))["logits"][0] for it in items])
        # the shortest item batched with ever longer ones (encoder and text padding both grow)
        shortest = [model(collate([items[0]] + items[1:k]))["logits"][0] for k in range(2, len(items) + 1)]
    assert torch.allclose(together, alone, atol=1e-4)
    assert torch.allclose(torch.stack(shortest), alone[0].expand(len(shortest)), atol=1e-4)


def test_encdec_judges_the_response_not_the_reference():
    model = warmed_up(build_model(ENCDEC, 3, 4, 8))
    items = varied_items()
    changed = [dict(it, feats=it["feats"].copy()) for it in items]
    for it in changed:
        it["feats"][: it["ref_n"]] += 3.0   # another reference, same response
    with torch.no_grad():
        a, b = model(collate(items))["logits"], model(collate(changed))["logits"]
    # only the durations come from the reference, and those are unchanged
    assert torch.allclose(a, b, atol=1e-5)


def test_encdec_auxiliary_loss_reference_and_correct_responses():
    model = build_model(ENCDEC, 3, 4, 8).train()
    batch = collate(varied_items())
    batch["ctc_response"] = torch.zeros(4, dtype=torch.bool)
    out = model(batch)
    assert "ref_token_nll" in out, "training forwards decode the TTS reference too"
    # no response scored correct: the reference's token CE and joint CTC only
    ref_only = out["ref_token_nll"].mean() + out["ref_ctc_nll"].mean()
    assert torch.allclose(model.auxiliary_loss(out, batch), ref_only)
    batch["ctc_response"][1] = True
    both = model.auxiliary_loss(out, batch)
    expected = (out["ref_token_nll"].sum() + out["token_nll"][1]) / 5 \
        + (out["ref_ctc_nll"].sum() + out["ctc_nll"][1]) / 5
    assert torch.allclose(both, expected)
    model.eval()
    with torch.no_grad():
        assert "ref_token_nll" not in model(batch), "prediction does not pay for the reference"


def test_encdec_checkpoint_loads_through_inference(tmp_path):
    from readaloud.pipeline.inference import load_fold_model
    cfg = variant_config("model4encdec", {"d_model": 32, "encoder_layers": 1, "encoder_heads": 2,
                                          "ffn_dim": 64, "decoder_layers": 1})
    vocab = Vocab(list("abcdefg"), "char")
    model = warmed_up(build_model(cfg.model, 3, 4, len(vocab)))
    path = tmp_path / "model4encdec_0.pth"
    # the fields training.py writes
    atomic_save({"format": 1, "variant": "model4encdec", "fold": 0, "n_folds": 3,
                 "config": json.dumps(cfg.to_dict()), "whisper_config": json.dumps(whisper_config_dict(model)),
                 "vocab": json.dumps(vocab.to_dict()), "tasks": ["a", "b", "c"], "grades": ["1", "2", "3", "KG"],
                 "priors": json.dumps({"a": 0.5}), "valid_logloss": 0.6,
                 "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)
    fm = load_fold_model(path, torch.device("cpu"))
    assert isinstance(fm.model, EncDecClassifier) and fm.name == "model4encdec"
    batch = collate(varied_items())
    with torch.no_grad():
        assert torch.allclose(model(batch)["logits"], fm.model(batch)["logits"], atol=1e-6)


def test_encdec_pretrained_backbone_and_its_rebuild(tmp_path):
    cfg = ModelConfig(arch="encdec", ctc_unit="char", backbone=save_tiny_whisper(tmp_path / "tiny-whisper"),
                      position_pool=1)
    model = build_model(cfg, 3, 4, 8)
    assert isinstance(model, EncDecClassifier)
    assert_encoder_is_the_tiny_whisper(model.encoder)
    assert model.decoder.config.d_model == 64 and len(model.decoder.layers) == cfg.decoder_layers
    items = at_whisper_positions(varied_items())
    model = warmed_up(model, items, steps=1)
    batch = collate(items)
    rebuilt = build_model(cfg, 3, 4, 8, whisper_config=whisper_config_dict(model))
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(batch)["logits"], rebuilt.eval()(batch)["logits"], atol=1e-6)
