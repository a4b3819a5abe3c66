"""model6asr's evidence beside the gbm family's member (members/gbm.py): closed-vocabulary transcripts
(closed.py), the expected text's log p after a prompt (prompted.py), greedy decoding loops (loops.py)
and the perturbed training copies Whisper may mishear (ear_augment.py). The Whisper pass they build on
(whisper/asr.py, whisper/normalise.py) is still under whisper/."""
