"""What a run is made of: its setup, state, data, checkpoints and metrics; opening a trained one."""
