"""Conversions between run directories and other formats (Hugging Face today); models/ stays pure."""
