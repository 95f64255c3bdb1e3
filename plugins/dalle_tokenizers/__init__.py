"""Built-in plugin dalle_tokenizers."""
