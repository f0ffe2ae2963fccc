"""Rendering every engine x streaming x TP combination, and `validate` against seeded faults."""

from __future__ import annotations

import itertools
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from builder import validate as validate_module
from builder.checkpoints import convert
from builder.cli import main as builder_main
from builder.render import MARKER, render_repository
from builder.render_config import FT_CAPABILITIES, NEMO_1P3B, RenderConfig, RenderError
from builder.runtime.core_io import CAPABILITIES as TORCH_CAPABILITIES
from builder.runtime.model_config import GptModelConfig
from builder.validate import validate_repository


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("engine,streaming,tp", list(itertools.product(("fastertransformer", "torch"),
                                                                       (False, True), (1, 2, 4))))
def test_every_combination_renders_and_parses(tmp_path: Path, engine: str, streaming: bool, tp: int) -> None:
    config = RenderConfig(tp=tp, engine=engine, streaming=streaming, output=tmp_path / "repo")
    repo = render_repository(config)
    configs = {p.parent.name: parse(p) for p in repo.glob("*/config.pbtxt")}
    assert set(configs) == {"ensemble", "preprocessing", "gpt3_1.3b", "postprocessing"}
    for path in repo.rglob("config.pbtxt"):
        assert "{{" not in path.read_text() and "{%" not in path.read_text()  # no template residue

    core, ensemble = configs["gpt3_1.3b"], configs["ensemble"]
    params = {k: v.string_value for k, v in core.parameters.items()}
    assert core.model_transaction_policy.decoupled is streaming
    if engine == "fastertransformer":
        assert core.backend == "fastertransformer"
        assert core.default_model_filename == f"{tp}-gpu"
        assert params["tensor_para_size"] == str(tp) and params["pipeline_para_size"] == "1"
        assert {"data_type", "model_type", "model_checkpoint_path", "int8_mode",
                "enable_custom_all_reduce"} <= set(params)
        assert [g.kind for g in core.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
        assert list(core.batch_input[0].target_name) == ["input_ids_item_shape"]
        ragged = [t.name for t in core.input if t.allow_ragged_batch]
        assert ragged == ["input_ids"]
    else:
        assert core.backend == "python"
        assert (repo / "gpt3_1.3b" / "1" / "model.py").is_file()
        assert (repo / "gpt3_1.3b" / "1" / "gpt_runtime" / "model_config.py").is_file()
        assert [g.kind for g in core.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    # The ensemble exposes exactly what the engine honours.
    ensemble_inputs = {t.name for t in ensemble.input}
    capabilities = FT_CAPABILITIES if engine == "fastertransformer" else TORCH_CAPABILITIES
    assert ("presence_penalty" in ensemble_inputs) == ("presence_penalty" in capabilities)
    assert ("min_tokens" in ensemble_inputs) == ("min_length" in capabilities)
    # Every repository declares both (clients always send them); a value it cannot honour is refused by name.
    assert {"stream", "exclude_input_in_output", "num_return_sequences", "seed"} <= ensemble_inputs
    assert ("frequency_penalty" in ensemble_inputs) == ("frequency_penalty" in capabilities)
    assert {"text_input", "max_tokens", "stop_words", "bad_words", "top_k", "top_p", "temperature"} <= ensemble_inputs
    ensemble_outputs = {t.name for t in ensemble.output}
    assert {"text_output", "finish_reason", "num_input_tokens", "num_output_tokens"} <= ensemble_outputs
    # Every rendered repository is internally consistent (weights aside: none were given).
    problems = [p for p in validate_repository(repo) if "no FT weights" not in p]
    assert problems == []
    for model in ("preprocessing", "postprocessing"):
        assert (repo / model / "1" / "vocab.json").is_file() and (repo / model / "1" / "merges.txt").is_file()


def test_streaming_postprocessing_reads_only_core_outputs(tmp_path: Path) -> None:
    repo = render_repository(RenderConfig(engine="torch", streaming=True, output=tmp_path / "r"))
    ensemble = parse(repo / "ensemble" / "config.pbtxt")
    post_step = ensemble.ensemble_scheduling.step[2]
    core_step = ensemble.ensemble_scheduling.step[1]
    assert set(post_step.input_map.values()) <= set(core_step.output_map.values())


@pytest.mark.parametrize("options,message", [
    ({"tp": 3}, "--tp 3 must divide the model's head_num 16"),
    ({"engine": "onnx"}, "--engine must be one of"),
    ({"device": "cpu"}, "--device cpu needs --engine torch"),
    ({"max_batch_size": 0}, "--max-batch-size must be in 1..4096"),
    ({"data_type": "int4"}, "--data-type must be one of"),
    ({"model_name": "../escape"}, "--model-name '../escape' must be"),
    ({"ensemble_name": 'bad"name'}, "--ensemble-name"),
    ({"model_name": "preprocessing"}, "must differ"),
    ({"engine": "torch", "pp": 2}, "--pp 2: the torch engine runs one pipeline stage"),
    ({"ft_checkpoint_path": "relative/path"}, "--ft-checkpoint-path must be an absolute path"),
])
def test_bad_options_are_refused_naming_the_option(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        RenderConfig(output=tmp_path / "r", **options)


def test_existing_output_needs_force_and_never_deletes_foreign_folders(tmp_path: Path) -> None:
    repo = render_repository(RenderConfig(output=tmp_path / "r"))
    with pytest.raises(RenderError, match="--force"):
        render_repository(RenderConfig(output=repo))
    render_repository(RenderConfig(output=repo, force=True))
    assert (repo / MARKER).is_file()
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "data.txt").write_text("keep me")
    with pytest.raises(RenderError, match="not written by `builder render`"):
        render_repository(RenderConfig(output=foreign, force=True))
    assert (foreign / "data.txt").read_text() == "keep me"


def test_render_cli_reports_errors_as_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(builder_main, ["render", "--tp", "3", "--output", str(tmp_path / "r")])
    assert result.exit_code != 0
    assert "Error: --tp 3 must divide the model's head_num 16" in result.output


# ---- with real (tiny) weights ----------------------------------------------------------------------------------


@pytest.fixture
def torch_repo(tmp_path: Path, tiny_ft_dir: Path) -> Path:
    model = GptModelConfig.from_ini(tiny_ft_dir / "config.ini")
    config = RenderConfig(engine="torch", device="cpu", data_type="fp32", checkpoint=tiny_ft_dir, model=model,
                          output=tmp_path / "repo")
    return render_repository(config)


def test_clean_repository_with_weights_validates(torch_repo: Path) -> None:
    assert validate_repository(torch_repo) == []
    result = CliRunner().invoke(builder_main, ["validate", str(torch_repo)])
    assert result.exit_code == 0 and "OK" in result.output


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.unlink()  # weights may be hard links to the shared fixture: never edit through them
    path.write_text(text.replace(old, new, 1))


def _truncate(path: Path) -> None:
    path.unlink()
    path.write_bytes(b"\0" * 12)


def _first_sharded_bin(repo: Path) -> Path:
    return sorted((repo / "gpt3_1.3b" / "1" / "1-gpu").glob("model.layers.0.attention.query_key_value.weight*.bin"))[0]


SEEDED_FAULTS = {
    "unproduced tensor": (lambda r: _edit(r / "ensemble" / "config.pbtxt", 'value: "_input_lengths" }\n      input_map',
                                          'value: "_input_lengthz" }\n      input_map'), "_input_lengthz"),
    "dtype mismatch": (lambda r: _edit(r / "preprocessing" / "config.pbtxt",
                                       'name: "input_ids"\n    data_type: TYPE_UINT32',
                                       'name: "input_ids"\n    data_type: TYPE_INT32'), "is TYPE_INT32 but input"),
    "missing weight file": (lambda r: _first_sharded_bin(r).unlink(), "query_key_value.weight"),
    "truncated weight file": (lambda r: _truncate(_first_sharded_bin(r)), "query_key_value.weight"),
    "missing merges": (lambda r: (r / "postprocessing" / "1" / "merges.txt").unlink(), "merges.txt is missing"),
    "config syntax": (lambda r: _edit(r / "postprocessing" / "config.pbtxt", "max_batch_size:", "max_batch_size ="),
                      "does not parse"),
    "output not written": (lambda r: _edit(r / "ensemble" / "config.pbtxt",
                                           'output_map { key: "finish_reason" value: "finish_reason" }', ""),
                           "output 'finish_reason' is not written"),
    "missing model.py": (lambda r: (r / "gpt3_1.3b" / "1" / "model.py").unlink(), "model.py"),
    "missing runtime": (lambda r: shutil.rmtree(r / "preprocessing" / "1" / "gpt_runtime"), "gpt_runtime"),
    "bad config.ini": (lambda r: _edit(r / "gpt3_1.3b" / "1" / "1-gpu" / "config.ini", "head_num = ", "head_num = x"),
                       "head_num"),
}


@pytest.mark.parametrize("fault", list(SEEDED_FAULTS))
def test_validate_catches_seeded_fault(torch_repo: Path, fault: str) -> None:
    seed, expected = SEEDED_FAULTS[fault]
    seed(torch_repo)
    problems = validate_repository(torch_repo)
    assert any(expected in p for p in problems), problems
    result = CliRunner().invoke(builder_main, ["validate", str(torch_repo)])
    assert result.exit_code == 1
    assert expected in result.output


def test_render_takes_limits_from_the_checkpoint(torch_repo: Path, tiny_ft_dir: Path) -> None:
    model = GptModelConfig.from_ini(tiny_ft_dir / "config.ini")
    pre = parse(torch_repo / "preprocessing" / "config.pbtxt")
    params = {k: v.string_value for k, v in pre.parameters.items()}
    assert params["max_pos_seq_len"] == str(model.max_pos_seq_len) != str(NEMO_1P3B.max_pos_seq_len)
    assert params["vocab_size"] == str(model.vocab_size)


def test_output_path_cannot_inject_into_a_rendered_config(tmp_path: Path) -> None:
    hostile = tmp_path / 'x" } }\nparameters { key: "injected" value: { string_value: "1'
    with pytest.raises(RenderError, match="--output"):
        RenderConfig(output=hostile)
    with pytest.raises(RenderError, match="--ft-checkpoint-path"):
        RenderConfig(output=tmp_path / "ok", ft_checkpoint_path='/models/a"b')


# ---- issue 11: the checkpoint's own limits, FT container paths, KIND_GPU on a machine without a GPU ---------------


def test_tp_is_checked_against_the_checkpoints_head_num(tmp_path: Path, tiny_ft_dir: Path, tiny_nemo: Path) -> None:
    heads = GptModelConfig.from_ini(tiny_ft_dir / "config.ini").head_num
    assert heads == 4 != NEMO_1P3B.head_num
    result = CliRunner().invoke(builder_main, ["render", "--tp", "3", "--engine", "torch", "--checkpoint",
                                               str(tiny_ft_dir), "--output", str(tmp_path / "r")])
    assert result.exit_code != 0
    assert f"Error: --tp 3 must divide the model's head_num {heads} (from {tiny_ft_dir / 'config.ini'})" \
        in result.output, result.output
    assert "head_num 16" not in result.output
    assert not (tmp_path / "r").exists()
    # --tp 2 divides the checkpoint's 4 heads: accepted, for weights split for 2 (each rank loads its own shard).
    result = CliRunner().invoke(builder_main, ["render", "--tp", "2", "--engine", "torch", "--checkpoint",
                                               str(tiny_ft_dir), "--output", str(tmp_path / "r2")])
    assert "holds weights split for 1 GPU(s) but --tp is 2" in result.output, result.output
    split = convert(tiny_nemo, tmp_path / "ft", infer_gpu_num=2, weight_data_type="fp16", progress=False)
    result = CliRunner().invoke(builder_main, ["render", "--tp", "2", "--engine", "torch", "--checkpoint",
                                               str(split), "--output", str(tmp_path / "r2")])
    assert result.exit_code == 0, result.output


@pytest.fixture
def ft_readme_repo(tmp_path: Path, tiny_nemo: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The README's FasterTransformer render, as written (relative paths from the working folder):
    render --tp 2 --checkpoint ft/2-gpu --ft-checkpoint-path /models/gpt3_1.3b/1/2-gpu --output model_repository"""
    monkeypatch.chdir(tmp_path)
    convert(tiny_nemo, Path("ft"), infer_gpu_num=2, weight_data_type="fp16", progress=False)
    result = CliRunner().invoke(builder_main, ["render", "--tp", "2", "--checkpoint", "ft/2-gpu",
                                               "--ft-checkpoint-path", "/models/gpt3_1.3b/1/2-gpu",
                                               "--output", "model_repository"])
    assert result.exit_code == 0, result.output
    assert not Path("/models/gpt3_1.3b/1/2-gpu").exists()  # the container path is not on this machine
    return Path("model_repository")


def test_validate_checks_ft_weights_in_the_repository_and_notes_the_container_path(ft_readme_repo: Path) -> None:
    result = CliRunner().invoke(builder_main, ["validate", "model_repository"])
    assert result.exit_code == 0, result.output
    assert "note: gpt3_1.3b: model_checkpoint_path /models/gpt3_1.3b/1/2-gpu is read inside" in result.output
    assert "model_repository/gpt3_1.3b/1/2-gpu" in result.output
    assert "model_repository: OK" in result.output and "problem" not in result.output
    # The repository's weights are what is checked: a truncated shard there is a problem.
    _truncate(sorted((ft_readme_repo / "gpt3_1.3b" / "1" / "2-gpu").glob("*query_key_value.weight.1.bin"))[0])
    result = CliRunner().invoke(builder_main, ["validate", "model_repository"])
    assert result.exit_code == 1 and "query_key_value.weight.1.bin" in result.output, result.output


def test_validate_warns_when_the_container_path_cannot_hold_the_repositorys_weights(ft_readme_repo: Path) -> None:
    _edit(ft_readme_repo / "gpt3_1.3b" / "config.pbtxt", "/models/gpt3_1.3b/1/2-gpu", "/models/other/1/2-gpu")
    findings = validate_module.check_repository(ft_readme_repo)
    assert findings.problems == []
    assert any("/models/other/1/2-gpu does not end with gpt3_1.3b/1/2-gpu" in w for w in findings.warnings), findings


@pytest.mark.parametrize("has_gpu", [False, True])
def test_validate_warns_about_kind_gpu_on_a_machine_without_a_gpu(tmp_path: Path, tiny_ft_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  has_gpu: bool) -> None:
    repo = render_repository(RenderConfig(engine="torch", device="gpu", checkpoint=tiny_ft_dir,
                                          model=GptModelConfig.from_ini(tiny_ft_dir / "config.ini"),
                                          output=tmp_path / "repo"))
    monkeypatch.setattr(validate_module, "gpu_available", lambda: has_gpu)
    result = CliRunner().invoke(builder_main, ["validate", str(repo)])
    assert result.exit_code == 0, result.output  # a warning, not a problem
    warned = "warning: gpt3_1.3b: instance_group is KIND_GPU but this machine has no GPU" in result.output
    assert warned is not has_gpu, result.output
    if not has_gpu:
        assert "--device cpu" in result.output and "OK (1 warning(s))" in result.output


def test_validate_does_not_look_for_a_gpu_for_kind_cpu_models(torch_repo: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def no_call() -> bool:
        raise AssertionError("gpu_available() called for a repository without KIND_GPU models")

    monkeypatch.setattr(validate_module, "gpu_available", no_call)
    findings = validate_module.check_repository(torch_repo)
    assert findings.problems == findings.warnings == []


def test_gpu_detection_agrees_with_torch() -> None:
    import torch

    assert validate_module.gpu_available() is torch.cuda.is_available()


def test_gpu_detection_without_torch_asks_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.setattr(validate_module.glob, "glob", lambda pattern: [])  # no /dev/nvidia* nodes
    monkeypatch.setenv("PATH", str(tmp_path))
    assert validate_module.gpu_available() is False  # no nvidia-smi on PATH
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    assert validate_module.gpu_available() is True
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\n"
                   "exit 9\n")
    assert validate_module.gpu_available() is False


def test_the_input_names_live_in_the_contract_module_only() -> None:
    """Issue 13: one declaration of the tensor contract. The compatibility names (and a few others that used to be
    written out in nine places) appear as string literals in builder/runtime/contract.py and nowhere else in the
    code that renders, validates, parses or sends requests."""
    root = Path(__file__).resolve().parents[1]
    derived = [root / "builder" / "render_config.py", root / "builder" / "validate.py",
               root / "builder" / "runtime" / "preprocess.py", root / "builder" / "runtime" / "core_io.py",
               root / "client" / "request.py", *sorted((root / "model_repository_templates").rglob("*.py")),
               *sorted((root / "model_repository_templates").rglob("*.j2"))]
    names = ("top_k", "presence_penalty", "frequency_penalty", "min_tokens", "length_penalty", "seed",
             "num_return_sequences", "beam_search_diversity_rate", "start_id", "return_log_probs")
    contract_text = (root / "builder" / "runtime" / "contract.py").read_text()
    for name in names:
        assert f'"{name}"' in contract_text, name
        for path in derived:
            assert f'"{name}"' not in path.read_text(), f"{name!r} written out in {path.relative_to(root)}"


def test_validate_finds_an_unused_ensemble_tensor_and_an_input_outside_the_contract(tmp_path: Path) -> None:
    repo = render_repository(RenderConfig(engine="torch", streaming=True, output=tmp_path / "r"))
    config = repo / "ensemble" / "config.pbtxt"
    text = config.read_text()
    # What an earlier draft of this change rendered: the core read the ensemble's own input, leaving preprocessing's
    # copy unread. Triton refuses such an ensemble at load ("ensemble tensor ... is unused").
    config.write_text(text.replace('input_map { key: "stream" value: "_stream" }',
                                   'input_map { key: "stream" value: "stream" }')
                      .replace('name: "top_k"', 'name: "topk"'))
    problems = validate_repository(repo)
    assert any("'_stream'" in p and "never read" in p for p in problems), problems
    assert any("'topk'" in p and "contract" in p for p in problems), problems
