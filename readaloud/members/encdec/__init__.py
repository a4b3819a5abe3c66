"""The encdec family (`model.arch = "encdec"`: model4encdec): the encoder-decoder classifier, a
decoder teacher-forced on the expected text (encdec.py), on the pair family's encoder, and the decoder
layer whose cross-attention works on the memory's side of its projections (cross_attention.py), which
model8decoder's teacher forcing runs too."""
