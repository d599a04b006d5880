"""vox: a StarGAN-style discriminator as a multi-head speech classifier, and tools to explain it."""
__version__ = "0.1.0"
