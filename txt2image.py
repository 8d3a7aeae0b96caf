"""Generate images from a text prompt: python txt2image.py "a photo of a cat"
(installed: sd-txt2image "a photo of a cat")."""

from stable_diffusion.cli import txt2image_main

if __name__ == "__main__":
    txt2image_main()
