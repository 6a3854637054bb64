"""lm-pretrain: pre-train decoder-only language models from scratch with PyTorch Lightning."""
