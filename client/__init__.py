"""Raw-text client for the Triton text ensemble: `TextClient`, `AsyncTextClient`, and `python -m client`."""

from .async_client import AsyncTextClient
from .errors import RequestError, RequestTimeoutError, ServerUnavailableError, TextClientError, WrongEndpointError
from .request import GenerationResult, SamplingParams
from .text_client import TextClient

__all__ = ["AsyncTextClient", "GenerationResult", "RequestError", "RequestTimeoutError", "SamplingParams",
           "ServerUnavailableError", "TextClient", "TextClientError", "WrongEndpointError"]
