"""Generate images from an image and a text prompt:
python image2image.py --strength 0.5 input.png "a lit fireplace"
(installed: sd-image2image --strength 0.5 input.png "a lit fireplace")."""

from stable_diffusion.cli import image2image_main

if __name__ == "__main__":
    image2image_main()
