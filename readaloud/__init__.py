"""readaloud: score read-aloud literacy screeners with a k-fold ensemble of speech models.

Design (2nd place of DrivenData's "Goodnight Moon, Hello Early Literacy Screening"):
speech-text comparison as speech classification. The expected response is synthesized
with TTS, its log-mel is put in front of the child's, a Whisper encoder reads the pair,
and a head turns the pooled encoding (+ task, grade) into P(score = 1).
"""
__version__ = "0.1.0"
