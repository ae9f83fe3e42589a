"""Adapter placement: recipe -> LoRA targets and configs."""
