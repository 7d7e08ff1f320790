"""Face models (detection, landmarks, embeddings) in JAX/Flax, read from the original files."""
