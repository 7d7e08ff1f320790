"""De-identification: face tracking and cropping, the deid pipeline and its evaluation."""
