"""`python -m builder`: one command group; each subcommand lives with the stage it drives and loads on first use."""

from __future__ import annotations

import importlib

import click

# name -> (module, attribute, one-line help). Modules import lazily so `--help` stays fast and a missing optional
# dependency of one stage never breaks the others.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "render": ("builder.render", "render_command", "Render the text-in/text-out Triton model repository."),
    "validate": ("builder.validate", "validate_command", "Check a rendered repository: configs, wiring, weights."),
    "serve": ("builder.serve_cli", "serve_command", "Start tritonserver on a model repository (foreground)."),
    "convert": ("builder.checkpoints.cli", "convert_command",
                "Convert a .nemo or HF GPT-2 checkpoint to FasterTransformer weights."),
    "checkpoint": ("builder.checkpoints.cli", "checkpoint_command",
                   "Write a random-weight .nemo checkpoint of a named shape (tiny, gpt3-1.3b)."),
    "demo-checkpoint": ("builder.checkpoints.cli", "demo_checkpoint_command",
                        "Train (once, cached) the tiny counting demo model as a .nemo file."),
    "demo": ("builder.demo", "demo_command",
             "End to end: demo checkpoint -> FT weights -> repository -> tritonserver, answering the seed example."),
    "deploy": ("builder.deploy.cli", "deploy_group",
               "Several replicas: Kubernetes manifests (k8s), or local serve processes behind HAProxy (local)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attribute, _ = COMMANDS[cmd_name]
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, _, short) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Turn a NeMo or GPT-2 checkpoint into a Triton model repository that takes text and returns text.

    \b
    Typical flow:
      python -m builder convert --in-file model.nemo --saved-dir weights --infer-gpu-num 1 --weight-data-type fp16
      python -m builder render --tp 1 --engine torch --device cpu --checkpoint weights/1-gpu --output model_repository
      python -m builder validate model_repository
      python -m builder serve model_repository
    """
