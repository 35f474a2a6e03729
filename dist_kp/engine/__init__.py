"""Training: the loop and its progress (trainer), periodic actions (hooks), what a checkpoint holds
and the resume decision (run_state), the checkpoint store (checkpoint), optimizer and LR schedule."""
