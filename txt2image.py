"""Generate images from a text prompt: python txt2image.py "a photo of a cat" """

from __future__ import annotations

from stable_diffusion import cli


def main() -> None:
    p = cli.parser("Generate images from a text prompt with Stable Diffusion in MLX.")
    args = p.parse_args()
    output = cli.check_arguments(p, args)

    sd = cli.load_model(p, args)
    width = sd.defaults.width if args.width is None else args.width
    height = sd.defaults.height if args.height is None else args.height
    seed = cli.seed(args)
    try:
        latents = sd.generate_latents(
            args.prompt,
            n_images=args.n_images,
            num_steps=args.steps,
            cfg_weight=args.cfg,
            negative_text=args.negative_prompt,
            seed=seed,
            width=width,
            height=height,
            sampler=args.sampler,
        )
    except ValueError as e:
        p.error(str(e))
    x = cli.denoise(sd, latents, args, output)
    parameters = cli.generation_parameters(sd, args, width, height)
    cli.decode_and_save(sd, x, args, output, parameters)


if __name__ == "__main__":
    main()
