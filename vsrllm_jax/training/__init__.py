"""Training: the loop, the jitted step, the objective and the optimizer."""
