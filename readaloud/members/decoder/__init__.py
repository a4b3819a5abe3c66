"""The whisperdec family (`model.arch = "whisperdec"`: model8decoder, model9contrast): a real Whisper's
decoder teacher-forced on the expected text (decoder.py) and its per-token scores in few passes
(vocab_scores.py). It reads the pair family's encoder and neural member (members/pair/) and the
encdec family's teacher forcing (members/encdec/)."""
