"""Corpora: the manifest reader/validator, and adapters that turn distributed corpora into manifests."""
from voxlib.audio import load_audio
from voxlib.corpora.manifest import Manifest, ManifestError, read_manifest

__all__ = ["Manifest", "ManifestError", "load_audio", "read_manifest"]
