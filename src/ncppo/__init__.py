"""ncppo: preference alignment of text-to-image diffusion models in latent and noise-conditioned
perceptual (NCP) space. The core API (objectives, latent and NCP errors) is pure torch and can be
dropped into any training loop; see the README's "Library use"."""

__version__ = "0.1.0"
