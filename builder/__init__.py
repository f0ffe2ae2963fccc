"""Build, validate and serve Triton model repositories for GPT text generation."""

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_ROOT.parent
TEMPLATES_DIR = PROJECT_ROOT / "model_repository_templates"
GPT2_TOKENIZER_DIR = PACKAGE_ROOT / "assets" / "gpt2"
