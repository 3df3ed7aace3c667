"""harden: scan, purify and harden PyTorch models from MLflow before they ship.

The library is usable from a notebook; the `harden` CLI is a thin layer over it::

    import harden
    model = harden.load_model("models:/harden-demo@candidate")
    data = harden.load_data("digits", model.input_spec)
    print(harden.evaluate(model, data, trigger="grid_paste", target=0))
"""

__version__ = "0.1.0"

from harden.attacks import make_trigger  # noqa: E402
from harden.data import load_data  # noqa: E402
from harden.evaluation import evaluate  # noqa: E402
from harden.models import load_model  # noqa: E402

__all__ = ["__version__", "evaluate", "load_data", "load_model", "make_trigger"]
