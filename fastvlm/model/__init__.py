"""Model definitions: FastViTHD, Qwen2, and the FastVLM composition."""
