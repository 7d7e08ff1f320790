"""The face stage's models (detector, landmarks, embedding) in JAX/Flax, read from the original files."""
