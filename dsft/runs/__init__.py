"""A run directory as every command sees it, below training: its layout, ownership and status
(`runs.run_dir`), its checkpoints, and its logged metrics (`runs.metrics`). Training writes runs;
eval, chat, merge and export read them. Nothing here imports training."""
