"""Files: covariance files (safetensors + metadata), atomic writes."""
