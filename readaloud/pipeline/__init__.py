"""The steps: pretraining, a fold run (and its neural loop), parallel jobs, checking, ensemble weights, inference."""
