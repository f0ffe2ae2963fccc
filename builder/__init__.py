"""Build, validate and serve Triton model repositories for GPT text generation."""

from pathlib import Path

import model_repository_templates

PACKAGE_ROOT = Path(__file__).resolve().parent
# Its own package (package data), found wherever it is installed: a checkout, an editable install or a wheel.
TEMPLATES_DIR = Path(model_repository_templates.__file__).resolve().parent
GPT2_TOKENIZER_DIR = PACKAGE_ROOT / "assets" / "gpt2"
