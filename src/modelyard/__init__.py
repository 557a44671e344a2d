"""modelyard: serve your own language models behind an OpenAI-compatible model-endpoints API."""

from .api.app import create_app
from .errors import ModelyardError
from .settings import EndpointSpec, Settings, load
from .store import ModelStore

__all__ = ["EndpointSpec", "ModelStore", "ModelyardError", "Settings", "create_app", "load"]
__version__ = "0.1.0"
