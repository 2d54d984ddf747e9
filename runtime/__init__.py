"""Lean runtime: loads engines and chains them. Never imports fvrt.builder or model definitions."""
