"""Data: corpus readers and cleaning, tokenizer training, token files and batches."""
