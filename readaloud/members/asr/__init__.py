"""model6asr's evidence, beside the gbm family's member (members/gbm.py): what a pretrained Whisper
hears in each clip (evidence.py: transcripts, teacher-forced log p, the per-clip cache),
closed-vocabulary transcripts (closed.py), the expected text's log p after a prompt (prompted.py),
greedy decoding loops (loops.py) and the perturbed training copies Whisper may mishear
(ear_augment.py). Loading a CTranslate2 Whisper and rendering the expected text as Whisper writes it
stay under whisper/ (asr.py, normalise.py): model8decoder reads them too."""
