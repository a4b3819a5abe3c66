"""The pair family (`model.arch = "pair"`: model1mean, model2attn, model3mapd, model7whisper): the
[TTS reference | pause | response] classifier (pair.py), and what every neural family builds on: the
Whisper encoder on the real length (encoder.py), the neural member's fit / load / predict
(neural.py) and the cached frozen lower layers of a real Whisper (frozen.py)."""
