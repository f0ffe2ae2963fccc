"""`python -m builder validate REPO`: find every problem in a model repository before tritonserver does.

Checks: each config.pbtxt parses (protobuf text format + tritonclient's model_config_pb2) and names its folder; the
ensemble wiring (every step input is an ensemble input or an earlier step's output, every required model input is
fed, every ensemble output is written, data types and shapes agree end to end); the Python models' files; the
tokenizer files; the FT weight files against config.ini (names, byte sizes, TP shards).

Three kinds of findings: problems (the repository cannot work; exit status 1), warnings (it can work, but not on this
machine as it stands, e.g. a KIND_GPU model and no GPU here; exit status 0) and notes (information, e.g. the path the
FasterTransformer backend will read inside its container).
"""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from .render import RUNTIME_FOLDER, TOKENIZER_FILES
from .runtime import contract
from .runtime.model_config import GptModelConfig, ModelConfigError

TensorSpec = tuple[int, list[int]]  # (data type enum, dims without the batch dim)


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)  # the repository cannot work as it is
    warnings: list[str] = field(default_factory=list)  # it can work, but not on this machine as it stands
    notes: list[str] = field(default_factory=list)  # information


def gpu_available() -> bool:
    """Whether this machine has a CUDA GPU that tritonserver could place KIND_GPU instances on.

    torch's answer when torch is installed (the pip tritonserver and the torch engine use the same CUDA runtime);
    otherwise a working `nvidia-smi -L` or an NVIDIA device node.
    """
    try:
        import torch  # slow to import; only needed here
    except ImportError:
        pass
    else:
        return bool(torch.cuda.is_available())
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            listing = None
        if listing is not None and listing.returncode == 0 and "GPU" in listing.stdout:
            return True
    return bool(glob.glob("/dev/nvidia[0-9]*"))


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
    # Triton refuses an ensemble whose step writes a tensor nothing reads ("ensemble tensor 'x' is unused").
    read = {value for step in ensemble.config.ensemble_scheduling.step for value in step.input_map.values()}
    for step in ensemble.config.ensemble_scheduling.step:
        for value in step.output_map.values():
            if value not in read and value not in ensemble.outputs:
                problems.append(f"{where}: tensor {value!r} written by {step.model_name} is never read")
    # The inputs are the text ensemble's contract (runtime/contract.py): a name or type it lacks reaches no model.
    for name, tensor in ensemble.inputs.items():
        declared = contract.ENSEMBLE.get(name)
        if declared is None:
            problems.append(f"{where}: input {name!r} is not in the text ensemble's contract "
                            f"(builder/runtime/contract.py)")
        elif _type_name(tensor.data_type) != f"TYPE_{declared.tensor.data_type}":
            problems.append(f"{where}: input {name!r} is {_type_name(tensor.data_type)}; the contract says "
                            f"TYPE_{declared.tensor.data_type}")
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


def _ft_weight_folder(model: Model, version: Path, findings: Findings) -> Path:
    """Where to check the FasterTransformer backend's weights on this machine.

    `model_checkpoint_path` is read by the backend inside its container (e.g. /models/<model>/1/<tp>-gpu with the
    repository mounted at /models), so it usually does not exist here: the weights checked are the repository's own
    folder, `<model>/<version>/<default_model_filename>`, and the container path is reported as a note. Only when the
    repository holds no weights and the path exists on this machine (render's default: the repository's absolute
    path, or weights kept outside it) is that path checked instead.
    """
    params = model.parameters
    folder_name = model.config.default_model_filename or f"{params.get('tensor_para_size', '1')}-gpu"
    local = version / folder_name
    container = params.get("model_checkpoint_path", "")
    if not container or Path(container).resolve() == local.resolve():
        return local
    if not (local / "config.ini").is_file() and (Path(container) / "config.ini").is_file():
        return Path(container)
    findings.notes.append(f"{model.name}: model_checkpoint_path {container} is read inside the FasterTransformer "
                          f"container; checked this repository's {local} instead, which must be mounted there")
    expected_tail = Path(model.name, version.name, folder_name).parts
    if Path(container).parts[-3:] != expected_tail:
        findings.warnings.append(f"{model.name}: model_checkpoint_path {container} does not end with "
                                 f"{'/'.join(expected_tail)}, so mounting this repository will not put its weights "
                                 "there; the backend reads only that path")
    return local


def check_weights(model: Model, findings: Findings) -> None:
    """The core GPT model's FT weight folder, wherever the engine will look for it."""
    from .runtime.ft_weights import check_weight_dir  # needs numpy only

    problems = findings.problems
    params = model.parameters
    version = model.version_folders()[-1]
    if model.config.backend == "fastertransformer":
        folder = _ft_weight_folder(model, version, findings)
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
    # FT always loads the split it is told; the torch engine merges any split at tensor_para_size 1 and otherwise
    # loads each rank's own shard files, so those must be split for exactly that many ranks.
    split_matters = model.config.backend == "fastertransformer" or params.get("tensor_para_size", "1") != "1"
    if split_matters and params.get("tensor_para_size", "1") != str(gpt.tensor_para_size):
        problems.append(f"{model.name}: parameter tensor_para_size={params.get('tensor_para_size')} but the weights "
                        f"in {folder} are split for {gpt.tensor_para_size} GPU(s)")
    if model.config.backend == "python":
        check_tensor_parallel_placement(model, problems)


def check_tensor_parallel_placement(model: Model, problems: list[str]) -> None:
    """The torch engine with tensor_para_size N > 1: one instance (rank 0, which starts the other ranks), on the first
    GPU of tp_devices when KIND_GPU."""
    params = model.parameters
    tp_text = params.get("tensor_para_size", "1")
    if not tp_text.isdigit() or int(tp_text) < 1:
        problems.append(f"{model.name}: parameter tensor_para_size={tp_text!r} is not a positive whole number")
        return
    tp = int(tp_text)
    if tp == 1:
        return
    groups = list(model.config.instance_group)
    counts = [max(1, g.count) for g in groups]  # no count (protobuf's 0): Triton starts one
    if counts != [1]:
        problems.append(f"{model.name}: tensor_para_size={tp} needs exactly one instance (rank 0 starts the other "
                        f"ranks), found {sum(counts)}")
        return
    devices = [d for d in params.get("tp_devices", "").split(",") if d]
    if groups[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU:
        if len(devices) != tp or len(set(devices)) != tp or not all(d.isdigit() for d in devices):
            problems.append(f"{model.name}: tensor_para_size={tp} on GPUs needs parameter tp_devices listing {tp} "
                            f"distinct GPU ids, got {params.get('tp_devices', '')!r}")
        elif list(groups[0].gpus) != [int(devices[0])]:
            problems.append(f"{model.name}: instance_group gpus {list(groups[0].gpus)} must be [{devices[0]}], the "
                            f"GPU of rank 0 in tp_devices {','.join(devices)}")
    elif devices:
        problems.append(f"{model.name}: parameter tp_devices is set but the instance group is not KIND_GPU")


def check_python_model(model: Model, problems: list[str]) -> None:
    version = model.version_folders()[-1]
    if not (version / "model.py").is_file():
        problems.append(f"{model.name}: Python backend model without {version / 'model.py'}")
    elif not (version / RUNTIME_FOLDER).is_dir():
        problems.append(f"{model.name}: {version / RUNTIME_FOLDER} is missing (the runtime modules model.py imports)")


def check_devices(model: Model, findings: Findings, has_gpu: Callable[[], bool]) -> None:
    """A KIND_GPU instance group loads only where tritonserver sees a GPU: warn when this machine has none."""
    kinds = {group.kind for group in model.config.instance_group}
    if model_config_pb2.ModelInstanceGroup.KIND_GPU in kinds and not has_gpu():
        findings.warnings.append(f"{model.name}: instance_group is KIND_GPU but this machine has no GPU, so "
                                 "tritonserver here will refuse to load it (\"KIND_GPU but no GPUs are available\"); "
                                 "to serve on this machine, render again with --device cpu (fine as is on a GPU host)")


def validate_repository(repository: Path) -> list[str]:
    """Every problem found, as readable lines; an empty list means the repository is sound."""
    return check_repository(repository, has_gpu=lambda: True).problems


def check_repository(repository: Path, has_gpu: Callable[[], bool] | None = None) -> Findings:
    """Problems, warnings for this machine and notes. has_gpu: whether this machine has a GPU (default
    `gpu_available`), asked only when a model needs one."""
    has_gpu = has_gpu or gpu_available
    findings = Findings()
    problems = findings.problems
    if not repository.is_dir():
        problems.append(f"{repository}: not a directory")
        return findings
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
        # A core model: token ids in and out, or text in and out on the torch engine (render --text-in-core).
        if ("input_ids" in model.inputs and "output_ids" in model.outputs) or model.parameters.get("text_io") == "true":
            check_weights(model, findings)
        check_devices(model, findings, has_gpu)
    orphans = sorted(name for name, m in models.items() if m.config.platform != "ensemble" and name not in feeds_text)
    if any(m.config.platform == "ensemble" for m in models.values()) and orphans:
        problems.append(f"models no ensemble uses (served anyway): {', '.join(orphans)}")
    return findings


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("repository", type=click.Path(exists=True, file_okay=False, path_type=Path))
def validate_command(repository: Path) -> None:
    """Check REPOSITORY: configs, ensemble wiring, tokenizer and FT weight files.

    Exits 1 on any problem. Warnings (e.g. a KIND_GPU model on a machine without a GPU) and notes are printed but
    leave the exit status 0.
    """
    findings = check_repository(repository)
    for note in findings.notes:
        click.echo(f"note: {note}")
    for warning in findings.warnings:
        click.echo(f"warning: {warning}")
    for problem in findings.problems:
        click.echo(f"problem: {problem}")
    if findings.problems:
        click.echo(f"{len(findings.problems)} problem(s) in {repository}", err=True)
        sys.exit(1)
    suffix = f" ({len(findings.warnings)} warning(s))" if findings.warnings else ""
    click.echo(f"{repository}: OK{suffix}")
