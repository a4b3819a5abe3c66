"""Pack the fitted ensemble into submission.zip for a code-execution runtime.

    python make_submission.py [--assets assets] [--out submission.zip]

The zip holds main.py at its root, the readaloud/ package, and under assets/: the
checkpoints model_configs.json ships, model_configs.json/.pkl, and vendor/espeakng_loader
(the espeak-ng library and voices, so TTS works offline without installing anything).
"""
import argparse
import json
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def build(assets: Path, out: Path) -> dict:
    config_path = assets / "model_configs.json"
    if not config_path.exists():
        raise SystemExit(f"{config_path} not found: run get_config.py first")
    config = json.loads(config_path.read_text())
    checkpoints = [c for m in config["members"] for c in m["checkpoints"]]
    missing = [c for c in checkpoints if not (assets / c).exists()]
    if missing:
        raise SystemExit(f"checkpoints listed in {config_path} are missing: {missing}")
    import espeakng_loader
    espeak = Path(espeakng_loader.__file__).parent
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(ROOT / "submission_src" / "main.py", "main.py")
        for f in sorted((ROOT / "readaloud").rglob("*.py")):
            z.write(f, str(f.relative_to(ROOT)))
        for name in checkpoints + ["model_configs.json", "model_configs.pkl"]:
            if (assets / name).exists():
                z.write(assets / name, f"assets/{name}")
        for f in sorted(espeak.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                z.write(f, f"assets/vendor/espeakng_loader/{f.relative_to(espeak)}")
    tmp.replace(out)
    return {"zip": str(out), "checkpoints": len(checkpoints), "megabytes": out.stat().st_size / 1e6}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default="assets")
    p.add_argument("--out", default="submission.zip")
    args = p.parse_args()
    info = build(Path(args.assets), Path(args.out))
    print(f"wrote {info['zip']}: {info['checkpoints']} checkpoints, {info['megabytes']:.1f} MB")


if __name__ == "__main__":
    main()
