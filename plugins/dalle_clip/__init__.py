"""Built-in plugin dalle_clip."""
