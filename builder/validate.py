"""`python -m builder validate REPO`: find every problem in a model repository before tritonserver does.

Checks: each config.pbtxt parses (protobuf text format + tritonclient's model_config_pb2) and names its folder; the
ensemble wiring (every step input is an ensemble input or an earlier step's output, every required model input is
fed, every ensemble output is written, data types and shapes agree end to end); the Python models' files; the
tokenizer files; the FT weight files against config.ini (names, byte sizes, TP shards).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from .render import RUNTIME_FOLDER, TOKENIZER_FILES
from .runtime.model_config import GptModelConfig, ModelConfigError

TensorSpec = tuple[int, list[int]]  # (data type enum, dims without the batch dim)


@dataclass
class Model:
    name: str
    folder: Path
    config: model_config_pb2.ModelConfig

    @property
    def inputs(self) -> dict[str, model_config_pb2.ModelInput]:
        return {t.name: t for t in self.config.input}

    @property
    def outputs(self) -> dict[str, model_config_pb2.ModelOutput]:
        return {t.name: t for t in self.config.output}

    @property
    def parameters(self) -> dict[str, str]:
        return {key: value.string_value for key, value in self.config.parameters.items()}

    def version_folders(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and p.name.isdigit())


def _type_name(data_type: int) -> str:
    return model_config_pb2.DataType.Name(data_type)


def _dims_agree(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def load_models(repository: Path, problems: list[str]) -> dict[str, Model]:
    models: dict[str, Model] = {}
    for folder in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        path = folder / "config.pbtxt"
        if not path.is_file():
            problems.append(f"{folder.name}: no config.pbtxt")
            continue
        try:
            config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        except text_format.ParseError as err:
            problems.append(f"{folder.name}/config.pbtxt: does not parse: {err}")
            continue
        if config.name and config.name != folder.name:
            problems.append(f"{folder.name}/config.pbtxt: name {config.name!r} differs from its folder {folder.name!r}")
        model = Model(folder.name, folder, config)
        if not model.version_folders():
            problems.append(f"{folder.name}: no numeric version folder (e.g. 1/)")
        models[folder.name] = model
    if not models:
        problems.append(f"{repository}: no models found")
    return models


def check_ensemble(ensemble: Model, models: dict[str, Model], problems: list[str]) -> None:
    where = f"ensemble {ensemble.name}"
    available: dict[str, TensorSpec] = {n: (t.data_type, list(t.dims)) for n, t in ensemble.inputs.items()}
    optional_inputs = {n for n, t in ensemble.inputs.items() if t.optional}
    for index, step in enumerate(ensemble.config.ensemble_scheduling.step):
        step_where = f"{where} step {index} ({step.model_name})"
        model = models.get(step.model_name)
        if model is None:
            problems.append(f"{step_where}: model {step.model_name!r} is not in the repository")
            continue
        if model.config.max_batch_size and ensemble.config.max_batch_size > model.config.max_batch_size:
            problems.append(f"{step_where}: ensemble max_batch_size {ensemble.config.max_batch_size} exceeds the "
                            f"model's {model.config.max_batch_size}")
        for key, value in step.input_map.items():
            model_input = model.inputs.get(key)
            if model_input is None:
                problems.append(f"{step_where}: input_map key {key!r} is not an input of {model.name}")
                continue
            if value not in available:
                problems.append(f"{step_where}: input {key!r} reads {value!r}, which no ensemble input or earlier "
                                "step produces")
                continue
            if value in optional_inputs and not model_input.optional:
                problems.append(f"{step_where}: required input {key!r} is fed by the optional ensemble input "
                                f"{value!r}")
            data_type, dims = available[value]
            if data_type != model_input.data_type:
                problems.append(f"{step_where}: {value!r} is {_type_name(data_type)} but input {key!r} of "
                                f"{model.name} is {_type_name(model_input.data_type)}")
            elif not _dims_agree(dims, list(model_input.dims)):
                problems.append(f"{step_where}: {value!r} has dims {dims} but input {key!r} of {model.name} "
                                f"has dims {list(model_input.dims)}")
        for name, model_input in model.inputs.items():
            if not model_input.optional and name not in step.input_map:
                problems.append(f"{step_where}: required input {name!r} of {model.name} is not fed")
        for key, value in step.output_map.items():
            model_output = model.outputs.get(key)
            if model_output is None:
                problems.append(f"{step_where}: output_map key {key!r} is not an output of {model.name}")
                continue
            available[value] = (model_output.data_type, list(model_output.dims))
    for name, output in ensemble.outputs.items():
        if name not in available or name in ensemble.inputs:
            problems.append(f"{where}: output {name!r} is not written by any step")
            continue
        data_type, dims = available[name]
        if data_type != output.data_type or not _dims_agree(dims, list(output.dims)):
            problems.append(f"{where}: output {name!r} is declared {_type_name(output.data_type)} "
                            f"{list(output.dims)} but produced as {_type_name(data_type)} {dims}")


def check_tokenizer(model: Model, folder: Path, problems: list[str]) -> None:
    for name in TOKENIZER_FILES:
        if not (folder / name).is_file():
            problems.append(f"{model.name}: tokenizer file {folder / name} is missing")
            return
    try:
        vocab = json.loads((folder / "vocab.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problems.append(f"{model.name}: {folder / 'vocab.json'} is not valid JSON: {err}")
        return
    if not isinstance(vocab, dict) or not vocab:
        problems.append(f"{model.name}: {folder / 'vocab.json'} holds no token table")
    merges = (folder / "merges.txt").read_text(errors="replace").splitlines()
    if len(merges) < 2 or any(len(line.split()) != 2 for line in merges[1:] if line):
        problems.append(f"{model.name}: {folder / 'merges.txt'} is not a BPE merges table")


def check_weights(model: Model, problems: list[str]) -> None:
    """The core GPT model's FT weight folder, wherever the engine will look for it."""
    from .runtime.ft_weights import check_weight_dir  # noqa: PLC0415  (needs numpy only)

    params = model.parameters
    version = model.version_folders()[-1]
    if model.config.backend == "fastertransformer":
        folder_name = model.config.default_model_filename or f"{params.get('tensor_para_size', '1')}-gpu"
        folder = Path(params["model_checkpoint_path"]) if params.get("model_checkpoint_path") else version / folder_name
    else:
        folder = version / params.get("model_dir", "")
    if not (folder / "config.ini").is_file():
        problems.append(f"{model.name}: no FT weights at {folder} (config.ini missing)")
        return
    try:
        gpt = GptModelConfig.from_ini(folder / "config.ini")
    except ModelConfigError as err:
        problems.append(f"{model.name}: {err}")
        return
    problems.extend(f"{model.name}: {problem}" for problem in check_weight_dir(folder))
    if model.config.backend == "fastertransformer" and params.get("tensor_para_size") != str(gpt.tensor_para_size):
        problems.append(f"{model.name}: parameter tensor_para_size={params.get('tensor_para_size')} but the weights "
                        f"in {folder} are split for {gpt.tensor_para_size} GPU(s)")


def check_python_model(model: Model, problems: list[str]) -> None:
    version = model.version_folders()[-1]
    if not (version / "model.py").is_file():
        problems.append(f"{model.name}: Python backend model without {version / 'model.py'}")
    elif not (version / RUNTIME_FOLDER).is_dir():
        problems.append(f"{model.name}: {version / RUNTIME_FOLDER} is missing (the runtime modules model.py imports)")


def validate_repository(repository: Path) -> list[str]:
    """Every problem found, as readable lines; an empty list means the repository is sound."""
    problems: list[str] = []
    if not repository.is_dir():
        return [f"{repository}: not a directory"]
    models = load_models(repository, problems)
    feeds_text = {step.model_name for m in models.values() if m.config.platform == "ensemble"
                  for step in m.config.ensemble_scheduling.step}
    for model in models.values():
        if not model.version_folders():
            continue
        if model.config.platform == "ensemble":
            check_ensemble(model, models, problems)
            continue
        if model.config.backend == "python":
            check_python_model(model, problems)
        if "text_input" in model.inputs or "text_output" in model.outputs:
            check_tokenizer(model, model.version_folders()[-1], problems)
        if "input_ids" in model.inputs and "output_ids" in model.outputs:
            check_weights(model, problems)
    orphans = sorted(name for name, m in models.items() if m.config.platform != "ensemble" and name not in feeds_text)
    if any(m.config.platform == "ensemble" for m in models.values()) and orphans:
        problems.append(f"models no ensemble uses (served anyway): {', '.join(orphans)}")
    return problems


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("repository", type=click.Path(exists=True, file_okay=False, path_type=Path))
def validate_command(repository: Path) -> None:
    """Check REPOSITORY: configs, ensemble wiring, tokenizer and FT weight files. Exits 1 on any problem."""
    problems = validate_repository(repository)
    for problem in problems:
        click.echo(f"problem: {problem}")
    if problems:
        click.echo(f"{len(problems)} problem(s) in {repository}", err=True)
        sys.exit(1)
    click.echo(f"{repository}: OK")
