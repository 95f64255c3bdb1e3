"""Built-in plugin dalle_vqvae."""
