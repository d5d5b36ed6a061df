"""ncppo: preference alignment of text-to-image diffusion models in latent and noise-conditioned
perceptual (NCP) space. The core API (objectives, latent and NCP errors) is pure torch and can be
dropped into any training loop; see the README's "Library use"."""

import logging as _logging

__version__ = "0.1.0"


class _NoTorchvisionFallbackNotice(_logging.Filter):
    """Drops transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to
    `CLIPImageProcessorPil`" notice. Importing diffusers' pipeline classes triggers it (their modules
    import the CLIP / SigLIP image processors, for safety checkers and IP adapters ncppo never loads),
    so every command printed two lines the user could not act on."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# A plain `logging` logger (transformers' own name for it): nothing is imported to filter it.
_logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())
