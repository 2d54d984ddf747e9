"""Single-file PyTorch ports of each LTX-2 / LTX-2.3 stage, written for static-shape export."""
