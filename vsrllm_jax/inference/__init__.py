"""Inference: the predictor, generation (greedy, sampling, beam search), decoding a split, scoring."""
