"""Models: the architecture registry, safe loading from MLflow and files, the pixel-space wrapper."""

from harden.models import archs as _archs  # noqa: F401  (registers the built-in architectures)
from harden.models.loader import LoadedModel, ModelArtifact, fetch_model, load_model
from harden.models.registry import ArchInfo, create_model, get_arch, list_archs, register_arch
from harden.models.safety import PickleScan, scan_pickles
from harden.models.spec import InputSpec, RegisteredVersion
from harden.models.wrappers import PixelModel

__all__ = [
    "ArchInfo", "InputSpec", "LoadedModel", "ModelArtifact", "PickleScan", "PixelModel", "RegisteredVersion",
    "create_model", "fetch_model", "get_arch", "list_archs", "load_model", "register_arch", "scan_pickles",
]
