"""Training: the loop and its progress (trainer), periodic actions (hooks), what a checkpoint holds (run_state),
the owner of saving and resuming (checkpointer), the checkpoint store (checkpoint), optimizer and LR schedule."""
