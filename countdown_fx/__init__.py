"""countdown-fx: CountDown contextual activation sparsity for gated FFNs, as a torch.compile backend."""

from __future__ import annotations

__version__ = "0.1.0"

from . import aoti, distributed  # small and cheap: `countdown_fx.aoti.check_toolchain()` works after the import
from .backend import countdown_backend
from .calibration import Calibration, calibrate
from .capture import find_sites
from .config import CountDownConfig
from .meter import SparsityMeter
from .passes.match import Site, SiteTable
from .sparsify import sparsify

__all__ = ["Calibration", "CountDownConfig", "CountDownTransformation", "Site", "SiteTable", "SparsityMeter",
           "calibrate", "countdown_backend", "find_sites", "sparsify", "__version__"]


def __getattr__(name: str):
    if name == "CountDownTransformation":  # needs optimum: imported only when asked for
        from .integrations.optimum import CountDownTransformation

        return CountDownTransformation
    raise AttributeError(f"module 'countdown_fx' has no attribute {name!r}")


def _register_backend_when_not_installed() -> None:
    """An installed package registers `backend="countdown"` through its entry point; a source checkout on
    sys.path has none, so register here (never both: Dynamo refuses a duplicate name)."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if any(ep.name == "countdown" for ep in entry_points(group="torch_dynamo_backends")):
        return
    if "countdown" not in registry._COMPILER_FNS:
        registry.register_backend(countdown_backend, name="countdown")


_register_backend_when_not_installed()
