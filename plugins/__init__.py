"""Kernels and custom ops shared by builder and runtime (torch.library ops with fake impls)."""
