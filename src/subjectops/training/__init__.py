"""Training: one loop for every method, built from small pieces, each in one place.

- `contract`: what a method gives the trainer (examples, phases) and gets back (batches).
- `losses`: the diffusion-loss equations as pure tensor functions (noising, targets, per-sample MSE, Min-SNR,
  x0 estimate, the Hypnos terms), tested on their own.
- `models`: the pieces of a text-to-image pipeline that training touches, and the denoising forward pass.
- `data`: the examples' cached VAE latent distributions and prompt embeddings, and the batches drawn from them.
- `checkpoints`: safetensors + JSON checkpoints (nothing is unpickled) and the step log.
- `loop`: the `Trainer`, which runs a method's phases on accelerate.

Import the submodules directly; this package imports nothing, so methods can use `losses` without a cycle.
"""
