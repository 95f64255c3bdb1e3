"""Built-in plugin dalle_transformer."""
