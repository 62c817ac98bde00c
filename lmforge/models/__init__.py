"""Model definitions. Each file reads top to bottom: config, blocks, model."""
