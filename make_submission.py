"""Pack the fitted ensemble into submission.zip for a code-execution runtime.

    python make_submission.py [--assets assets] [--out submission.zip]

The runtime is assumed to have only the packages of requirements-runtime.txt (a PyTorch runtime's
usual ones; the zip carries that file too). Everything else travels in the zip: main.py at its
root, the readaloud/ package, and under assets/: the checkpoints model_configs.json ships,
model_configs.json/.pkl, the CTranslate2 Whisper folders of every backbone a shipped checkpoint
reads (backbones/ct2/<name>: once, however many folds read them; model8decoder's checkpoints hold
only their trained weights), model6asr's fold ear if it reads one (ears/<key>), and vendor/ with the CTranslate2 engine (ctranslate2 and its bundled
libraries, MIT) and espeak-ng's library and voices (espeakng_loader), so nothing is installed there.
"""
import argparse
import json
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RUNTIME_REQUIREMENTS = "requirements-runtime.txt"


def package_folders(module: str) -> list[Path]:
    """An installed package's folder, and its wheel's bundled libraries (<name>.libs) if any."""
    import importlib
    folder = Path(importlib.import_module(module).__file__).resolve().parent
    return [folder] + [p for p in [folder.with_name(f"{module}.libs")] if p.is_dir()]


def shipped_backbones(assets: Path, checkpoints: list[str]) -> dict[str, Path]:
    """{name: CTranslate2 folder} of the named Whisper backbones the checkpoints read (their configs; a
    fold ear's backbone too, whose encoder it decodes from, even where no model8decoder is shipped)."""
    from readaloud.checkpoints import safe_load
    from readaloud.config import RunConfig
    from readaloud.members.registry import member_for
    from readaloud.whisper.backbones import NAMED_BACKBONES, ct2_model_dir
    names: set[str] = set()
    for checkpoint in checkpoints:
        cfg = RunConfig.from_dict(json.loads(safe_load(assets / checkpoint)["config"]))
        wanted = member_for(cfg).backbones_read(cfg)
        unnamed = sorted(b for b in wanted if b and b not in NAMED_BACKBONES)
        if unnamed:
            raise SystemExit(f"{checkpoint} reads backbone(s) {unnamed}, which make_submission.py cannot ship "
                             f"(only the named ones: {', '.join(NAMED_BACKBONES)})")
        names |= {b for b in wanted if b}
    return {name: ct2_model_dir(name, assets / "backbones" / "ct2") for name in sorted(names)}


def shipped_ears(assets: Path, checkpoints: list[str]) -> list[Path]:
    """The fold ears (members/gbm/fold_ears.py) the checkpoints read test rows with: <assets>/ears/<key>."""
    from readaloud.checkpoints import safe_load
    from readaloud.whisper.adapt import is_ear
    keys = sorted({str(ck["fold_ear"]) for ck in (safe_load(assets / c) for c in checkpoints) if "fold_ear" in ck})
    missing = [k for k in keys if not is_ear(assets / "ears" / k)]
    if missing:
        raise SystemExit(f"the fold ears {missing} that the checkpoints read are not in {assets / 'ears'}: retrain them")
    return [assets / "ears" / k for k in keys]


def build(assets: Path, out: Path) -> dict:
    config_path = assets / "model_configs.json"
    if not config_path.exists():
        raise SystemExit(f"{config_path} not found: run get_config.py first")
    config = json.loads(config_path.read_text())
    checkpoints = [c for m in config["members"] for c in m["checkpoints"]]
    missing = [c for c in checkpoints if not (assets / c).exists()]
    if missing:
        raise SystemExit(f"checkpoints listed in {config_path} are missing: {missing}")
    backbones = shipped_backbones(assets, checkpoints)
    ears = shipped_ears(assets, checkpoints)
    vendored = {m: package_folders(m) for m in ("espeakng_loader", "ctranslate2")}
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(ROOT / "submission_src" / "main.py", "main.py")
        z.write(ROOT / RUNTIME_REQUIREMENTS, RUNTIME_REQUIREMENTS)
        for f in sorted((ROOT / "readaloud").rglob("*.py")):
            z.write(f, str(f.relative_to(ROOT)))
        for name in checkpoints + ["model_configs.json", "model_configs.pkl"]:
            if (assets / name).exists():
                z.write(assets / name, f"assets/{name}")
        for name, folder in backbones.items():
            for f in sorted(folder.iterdir()):
                if f.is_file():
                    z.write(f, f"assets/backbones/ct2/{name}/{f.name}")
        for folder in ears:
            for f in sorted(folder.iterdir()):
                if f.is_file():
                    z.write(f, f"assets/ears/{folder.name}/{f.name}")
        for folders in vendored.values():
            for folder in folders:
                for f in sorted(folder.rglob("*")):
                    if f.is_file() and "__pycache__" not in f.parts:
                        z.write(f, f"assets/vendor/{folder.name}/{f.relative_to(folder)}")
    tmp.replace(out)
    return {"zip": str(out), "checkpoints": len(checkpoints), "backbones": sorted(backbones), "ears": len(ears),
            "vendored": sorted(vendored), "megabytes": out.stat().st_size / 1e6}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default="assets")
    p.add_argument("--out", default="submission.zip")
    args = p.parse_args()
    info = build(Path(args.assets), Path(args.out))
    print(f"wrote {info['zip']}: {info['checkpoints']} checkpoints, backbones {', '.join(info['backbones']) or 'none'}, "
          f"vendored {', '.join(info['vendored'])}; {info['megabytes']:.1f} MB. The runtime needs only "
          f"{RUNTIME_REQUIREMENTS} (inside the zip)")


if __name__ == "__main__":
    main()
