"""The face stage's models (detector, landmarks, embedding) in JAX, read from the original files."""
