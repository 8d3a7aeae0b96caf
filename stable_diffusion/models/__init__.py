"""The models in plain MLX: the text encoders (`clip.py`), the UNet (`unet.py`) and the
autoencoder (`vae.py`), built from `layers.py`."""
