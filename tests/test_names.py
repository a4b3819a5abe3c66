"""One word for one thing (docs/architecture.md): a configured family is a *variant*; the scripts'
--models, the name users type, is also accepted as --variants."""
import pytest

from conftest import run_script


@pytest.mark.parametrize("script", ["train.py", "check_models.py", "get_config.py"])
def test_models_is_also_spelled_variants(root, script):
    text = run_script(root, script, "--help").stdout
    assert "--models" in text and "--variants" in text
