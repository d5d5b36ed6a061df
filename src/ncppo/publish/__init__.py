"""Publishing a trained run: `ncppo export` to the kohya LoRA format (A1111, ComfyUI, Forge), the
diffusers LoRA file and a merged pipeline, and the Hub model card (README.md) of every run.

Modules: `run` (read a training output or checkpoint back), `kohya`, `diffusers_format`, `merge`
(one format each), `card` (the model card), `export` (`ncppo export`: format checks and dispatch).
"""
