"""OpenAI-compatible HTTP API in front of the text ensemble (`python -m builder serve REPO --openai-port PORT`)."""

from .app import ApiSettings, create_app
from .server import API_KEY_ENV, ApiServerError, OpenAIServer, api_settings, check_binding

__all__ = ["API_KEY_ENV", "ApiServerError", "ApiSettings", "OpenAIServer", "api_settings", "check_binding",
           "create_app"]
