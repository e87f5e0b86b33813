"""Flower ClientApp: local DP-SGD training of the LoRA adapter and the privacy ledger."""
