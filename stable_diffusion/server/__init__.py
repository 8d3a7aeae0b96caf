"""A resident model behind AUTOMATIC1111's web API (`/sdapi/v1/*`) and a web page.

Start it with ``python -m stable_diffusion.server --model sdxl``; the optional dependencies
are in ``requirements-server.txt``. Only this package imports them.

* `engine`: the one module that calls the pipeline (load, generate, decode, LoRAs).
* `jobs`: the single worker thread that owns the model and runs one job at a time.
* `catalog`: the models and LoRAs a request may name, confined to their folders.
* `names`: A1111's sampler and scheduler names, and its ``<lora:name:weight>`` syntax.
* `models`: the pydantic request and response models, with A1111's field names.
* `app`: the FastAPI application.
"""
