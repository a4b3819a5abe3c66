"""Data preparation: a data folder -> cached inputs (TTS references, clip features, folds, pair batches)."""
