"""Tables and figures of the study, built from run directories written by hf_entropy_callback."""
