"""dlib's face models (detector, 68-point landmarks, embedding) read from their files, in JAX."""
