"""Built-in plugin dalle_dvae."""
