"""MoE-native kernels: grouped expert matmuls, NF4 expert storage, expert LoRA, routing."""
