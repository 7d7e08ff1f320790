"""safetriage-jax: SafeTriage-style facial-video de-identification on a Flax TPSMM backbone."""
