"""Built-in plugin dalle_engines."""
