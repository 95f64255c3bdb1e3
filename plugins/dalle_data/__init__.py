"""Built-in plugin dalle_data."""
