"""Training: SFT over TRL's trainers, run directories, callbacks."""
