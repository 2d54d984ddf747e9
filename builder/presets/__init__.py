"""Official `config` metadata of the released checkpoints (JSON), used to build full-size random models and,
shrunk by `fvrt.builder.configs.tiny_config`, the tiny test models."""
