"""What rank 0 records of a run, each a hook: metrics.jsonl (metrics_file), W&B (wandb_run),
TensorBoard (tensorboard), pictures of predictions (pictures)."""
