"""Generate images from an image and a text prompt:
python image2image.py --strength 0.5 input.png "a lit fireplace" """

from __future__ import annotations

from stable_diffusion import cli
from stable_diffusion.images import load_image


def main() -> None:
    p = cli.parser(
        "Transform an image guided by a text prompt with Stable Diffusion in MLX.",
        image_input=True,
    )
    args = p.parse_args()
    output = cli.check_arguments(p, args)
    try:
        image, message = load_image(args.image, multiple=64)
    except ValueError as e:
        p.error(str(e))
    if message:
        print(message)

    sd = cli.load_model(p, args)
    seed = cli.seed(args)
    try:
        latents = sd.generate_latents_from_image(
            image,
            args.prompt,
            strength=args.strength,
            n_images=args.n_images,
            num_steps=args.steps,
            cfg_weight=args.cfg,
            negative_text=args.negative_prompt,
            seed=seed,
            sampler=args.sampler,
        )
    except ValueError as e:
        p.error(str(e))
    x = cli.denoise(sd, latents, args, output)
    height, width = image.shape[:2]
    parameters = cli.generation_parameters(sd, args, width, height, strength=args.strength)
    cli.decode_and_save(sd, x, args, output, parameters)


if __name__ == "__main__":
    main()
