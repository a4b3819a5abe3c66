"""Pretrained Whisper backbones available offline: read CTranslate2 folders, convert them to
transformers checkpoints, and resolve a `--backbone` name to a folder."""
