"""Every registered variant trains a tiny fold with its own defaults, as its script runs it
(`python train_model<variant>.py --fold 0 --n_folds 2`): a checkpoint, its out-of-fold scores, and a
saved config that names what the variant reads (the pair family: Whisper tiny.en, with no flag)."""
import json

import pandas as pd
import pytest

from conftest import preprocessed_demo, run_script
from readaloud.variants import VARIANTS, variant_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, root):
    base = tmp_path_factory.mktemp("every_variant")
    data, tts = preprocessed_demo(root, base, n_train=24, n_test=6, seed=11)
    return {"base": base, "data": data, "tts": tts, "env": {"READALOUD_BACKBONES": str(base / "backbones")}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_a_tiny_fold_with_its_defaults(tiny, root, variant):
    assets = tiny["base"] / "assets"
    run_script(root, f"train_model{variant.removeprefix('model')}.py", "--fold", 0, "--n_folds", 2,
               "--data", tiny["data"], "--assets", assets, "--tts_dir", tiny["tts"], "--epochs", 1, "--max_updates", 2,
               env=tiny["env"])
    assert (assets / f"{variant}_0.pth").is_file()
    oof = pd.read_csv(assets / f"{variant}_0_oof.csv")
    folds = pd.read_csv(tiny["data"] / "cache" / "folds_2.csv")
    assert set(oof["filename"]) == set(folds.loc[folds["fold"] == 0, "filename"]), "scores the held-out fold"
    assert oof["logit"].notna().all()
    saved = json.loads((assets / "runs" / f"{variant}_0" / "config.json").read_text())
    expected = variant_config(variant)
    assert saved["model"]["arch"] == expected.model.arch
    assert saved["model"]["backbone"] == expected.model.backbone
    if expected.model.arch in ("pair", "encdec", "whisperdec"):
        assert saved["model"]["backbone"] == "whisper-tiny.en", "a neural variant reads a pretrained Whisper by default"
