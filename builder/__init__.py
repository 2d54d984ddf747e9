"""Builder side: model definitions, checkpoint loading, export (imports torch model code)."""
