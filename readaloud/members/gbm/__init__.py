"""The gbm family (`model.arch = "gbm"`: model5gbm, model6asr): gradient boosting with its trees
exported to tensors (gbm.py) on DTW / voice-activity features (alignment.py) and, for model6asr, on
what a pretrained Whisper hears in each clip (evidence.py: transcripts, teacher-forced log p, the
per-clip cache), closed-vocabulary transcripts (closed.py), the expected text's log p after a prompt
(prompted.py), greedy decoding loops (loops.py) and the perturbed training copies Whisper may mishear
(ear_augment.py). Loading a CTranslate2 Whisper and rendering the expected text as Whisper writes it
stay in whisper/asr.py, and the transcript normalisation in readaloud/normalise.py: model8decoder reads
them too."""
