"""model8decoder's adapted ear (--decoder_ear_layers): the top encoder layer trains inside its fold,
on the fold's training clips only, from a cache of the layers below; a fold killed after its first
evaluation and resumed ends bit for bit where an uninterrupted one does; the checkpoint carries the
adapted layer and loads."""
import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from conftest import run_script
from readaloud.checkpoints import safe_load

EAR = ["--decoder_ear_layers", 1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, root):
    base = tmp_path_factory.mktemp("ear")
    data = base / "data"
    run_script(root, "make_demo_data.py", "--out", data, "--n-train", 12, "--n-test", 4, "--seed", 5)
    run_script(root, "preprocess.py", "--data", data, "--tts_dir", base / "tts", "--n_folds", 2, "--workers", 1)
    return base


def train_fold(root, base, data, assets, epochs, *extra):
    args = ["train_model8decoder.py", "--fold", 0, "--n_folds", 2, "--data", data, "--assets", assets,
            "--tts_dir", base / "tts", "--epochs", epochs, "--threads", 2, *EAR]
    return run_script(root, *extra, *args, ok=not extra)


def trained_weights(assets) -> dict[str, torch.Tensor]:
    return safe_load(assets / "model8decoder_0.pth")["state_dict"]


def test_the_ear_adapts_on_the_folds_training_clips_only(demo, root):
    """Fold 0 trained twice, the second time with every clip it scores (its OOF clips) replaced by
    other audio: the trained weights, the ear's included, are the same bit for bit, so no OOF clip's
    audio reached the ear; and the ear did train (it differs from the backbone's layer)."""
    data = demo / "data"
    train_fold(root, demo, data, demo / "assets_a", 1)
    other = demo / "data_oof_changed"
    shutil.copytree(data, other)
    folds = pd.read_csv(other / "cache" / "folds_2.csv")
    held_out = folds.loc[folds["fold"] == 0, "filename"].tolist()
    assert held_out
    for name in held_out:   # same names, other audio: the content-keyed caches recompute them
        audio, sr = sf.read(other / name, dtype="float32")
        sf.write(other / name, audio[::-1].copy() * 0.5, sr)
    train_fold(root, demo, other, demo / "assets_b", 1)
    a, b = trained_weights(demo / "assets_a"), trained_weights(demo / "assets_b")
    assert set(a) == set(b) and "encoder.layers.3.fc1.weight" in a, "the ear's layer is saved with the fold"
    assert all(torch.equal(a[k], b[k]) for k in a), "an OOF clip's audio changed the fold's weights"
    from readaloud.members.decoder.decoder import backbone_state
    pretrained = backbone_state("whisper-tiny.en")["encoder.layers.3.fc1.weight"]
    assert not torch.equal(a["encoder.layers.3.fc1.weight"], pretrained), "the ear trained"
    oof_a = pd.read_csv(demo / "assets_a" / "model8decoder_0_oof.csv")
    oof_b = pd.read_csv(demo / "assets_b" / "model8decoder_0_oof.csv")
    assert not np.allclose(oof_a["logit"], oof_b["logit"]), "the OOF clips themselves were scored anew"


def test_a_resumed_adaptation_ends_bit_identical(demo, root):
    data = demo / "data"
    train_fold(root, demo, data, demo / "assets_whole", 2)
    killed = train_fold(root, demo, data, demo / "assets_resumed", 2, "tests/fault_injection.py", "die_after_eval", 1)
    assert killed.returncode == 137, killed.stderr[-2000:]
    resumed = train_fold(root, demo, data, demo / "assets_resumed", 2)
    assert "resumed from" in resumed.stderr
    whole, again = trained_weights(demo / "assets_whole"), trained_weights(demo / "assets_resumed")
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_the_ear_checkpoint_loads_and_predicts(demo, root):
    from readaloud.pipeline.inference import load_fold_model
    assets = demo / "assets_a"
    if not (assets / "model8decoder_0.pth").exists():
        train_fold(root, demo, demo / "data", assets, 1)
    model = load_fold_model(assets / "model8decoder_0.pth", torch.device("cpu")).predictor.model
    assert model.cfg.decoder_ear_layers == 1 and len(model.ear_modules()) == 2
    assert all(p.requires_grad for m in model.ear_modules() for p in m.parameters())
    assert not any(p.requires_grad for p in model.encoder.layers[0].parameters())
    assert torch.equal(model.encoder.layers[3].fc1.weight, trained_weights(assets)["encoder.layers.3.fc1.weight"])
