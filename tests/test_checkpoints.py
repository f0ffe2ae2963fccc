"""Checkpoint conversion: HF GPT-2 and .nemo -> FT weights, TP re-splitting, untrusted input, the demo model.

The oracle is HF `GPT2LMHeadModel` (the same math as NeMo GPT-3). The Megatron layout the .nemo files use is built
here by hand from the HF weights, following Megatron's rules, independently of the converter's code.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from fixtures_checkpoints import reference_greedy, reference_logits
from transformers import GPT2Config, GPT2LMHeadModel

from builder import GPT2_TOKENIZER_DIR
from builder.checkpoints import CheckpointError, convert, write_synthetic_checkpoint
from builder.checkpoints.nemo import nemo_model_config, write_nemo
from builder.cli import main as builder_main
from builder.runtime.ft_weights import load_ft_weights
from builder.runtime.model_config import GptModelConfig

H, HEADS, LAYERS, FFN, POSITIONS = 32, 4, 2, 64, 64
D = H // HEADS


def random_hf_model(vocab_size: int = 50257, seed: int = 0, **overrides: object) -> GPT2LMHeadModel:
    """A GPT-2 whose every parameter is random (HF's init zeroes biases, which would hide bias layout bugs)."""
    settings: dict[str, object] = dict(vocab_size=vocab_size, n_positions=POSITIONS, n_embd=H, n_layer=LAYERS,
                                       n_head=HEADS, n_inner=FFN, activation_function="gelu_new",
                                       layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256)
    config = GPT2Config(**(settings | overrides))
    model = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.1
            parameter.copy_(noise + 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else noise)
    return model


def save_hf(model: GPT2LMHeadModel, directory: Path, tokenizer: bool = True) -> Path:
    model.save_pretrained(directory)
    if tokenizer:
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(GPT2_TOKENIZER_DIR / name, directory / name)
    return directory


def bin_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("model.*.bin"))}


def megatron_state_from_hf(model: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    """Megatron (legacy NeMo) state dict of an HF GPT-2, built the way Megatron lays out its tensors:
    nn.Linear [out, in] and a fused QKV whose output rows go head by head: [q_h | k_h | v_h] for h = 0..heads-1."""
    sd = {k.removeprefix("transformer."): v.detach().clone() for k, v in model.state_dict().items()}
    out = {"model.language_model.embedding.word_embeddings.weight": sd["wte.weight"],
           "model.language_model.embedding.position_embeddings.weight": sd["wpe.weight"],
           "model.language_model.encoder.final_layernorm.weight": sd["ln_f.weight"],
           "model.language_model.encoder.final_layernorm.bias": sd["ln_f.bias"]}
    for i in range(LAYERS):
        hf, mg = f"h.{i}.", f"model.language_model.encoder.layers.{i}."
        w_q, w_k, w_v = sd[hf + "attn.c_attn.weight"].split(H, dim=1)  # each [in, out]
        b_q, b_k, b_v = sd[hf + "attn.c_attn.bias"].split(H)
        rows, bias = [], []
        for head in range(HEADS):
            cols = slice(head * D, (head + 1) * D)
            rows += [w_q[:, cols].T, w_k[:, cols].T, w_v[:, cols].T]
            bias += [b_q[cols], b_k[cols], b_v[cols]]
        out |= {
            mg + "input_layernorm.weight": sd[hf + "ln_1.weight"], mg + "input_layernorm.bias": sd[hf + "ln_1.bias"],
            mg + "self_attention.query_key_value.weight": torch.cat(rows), mg + "self_attention.query_key_value.bias":
                torch.cat(bias),
            mg + "self_attention.dense.weight": sd[hf + "attn.c_proj.weight"].T.contiguous(),
            mg + "self_attention.dense.bias": sd[hf + "attn.c_proj.bias"],
            mg + "post_attention_layernorm.weight": sd[hf + "ln_2.weight"],
            mg + "post_attention_layernorm.bias": sd[hf + "ln_2.bias"],
            mg + "mlp.dense_h_to_4h.weight": sd[hf + "mlp.c_fc.weight"].T.contiguous(),
            mg + "mlp.dense_h_to_4h.bias": sd[hf + "mlp.c_fc.bias"],
            mg + "mlp.dense_4h_to_h.weight": sd[hf + "mlp.c_proj.weight"].T.contiguous(),
            mg + "mlp.dense_4h_to_h.bias": sd[hf + "mlp.c_proj.bias"],
        }
    return {k: v.to(torch.float16) for k, v in out.items()}


def megatron_tp_shards(state: Mapping[str, torch.Tensor], tp: int) -> list[dict[str, torch.Tensor]]:
    """Split a TP-1 Megatron state dict the way Megatron's parallel layers hold it."""
    column_parallel = ("word_embeddings.weight", "query_key_value.weight", "query_key_value.bias",
                       "dense_h_to_4h.weight", "dense_h_to_4h.bias")  # split on the output (first) axis
    row_parallel = ("self_attention.dense.weight", "dense_4h_to_h.weight")  # split on the input (second) axis
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for key, tensor in state.items():
        if key.endswith(column_parallel):
            pieces = tensor.chunk(tp, dim=0)
        elif key.endswith(row_parallel):
            pieces = tensor.chunk(tp, dim=1)
        else:
            pieces = (tensor,) * tp
        for rank, piece in enumerate(pieces):
            shards[rank][key] = piece.contiguous()
    return shards


def nemo_config_for(model: GPT2LMHeadModel) -> dict[str, object]:
    shape = GptModelConfig(head_num=HEADS, size_per_head=D, inter_size=FFN, num_layer=LAYERS,
                           vocab_size=model.config.vocab_size, max_pos_seq_len=POSITIONS)
    return nemo_model_config(shape)


# ---- HF GPT-2 -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model() -> GPT2LMHeadModel:
    return random_hf_model()


@pytest.fixture(scope="module")
def hf_dir(hf_model: GPT2LMHeadModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf(hf_model, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def hf_tp1(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(hf_dir, tmp_path_factory.mktemp("hf_ft"), progress=False)


def test_hf_conversion_reproduces_hf_logits(hf_model: GPT2LMHeadModel, hf_tp1: Path) -> None:
    config, weights = load_ft_weights(hf_tp1)
    assert (config.vocab_size, config.hidden_size, config.num_layer, config.tensor_para_size) == (50257, H, LAYERS, 1)
    assert (config.start_id, config.end_id, config.layernorm_eps, config.activation_type) == (50256, 50256, 1e-5,
                                                                                              "Gelu")
    ids = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(reference_logits(config, weights, ids), expected, rtol=1e-5, atol=1e-5)
    assert (hf_tp1 / "vocab.json").read_bytes() == (GPT2_TOKENIZER_DIR / "vocab.json").read_bytes()
    assert (hf_tp1 / "merges.txt").is_file()


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_shards_reassemble_to_tp1(hf_dir: Path, hf_tp1: Path, tmp_path: Path, tp: int) -> None:
    split = convert(hf_dir, tmp_path, infer_gpu_num=tp, progress=False)
    assert split.name == f"{tp}-gpu"
    _, merged = load_ft_weights(split)
    _, whole = load_ft_weights(hf_tp1)
    assert merged.keys() == whole.keys()
    for stem in whole:
        torch.testing.assert_close(merged[stem], whole[stem], rtol=0, atol=0)
    # Each rank holds whole heads of q, k and v (FT's contract), checked on the raw files.
    qkv = whole["model.layers.1.attention.query_key_value.weight"]  # [H, 3, H]
    last = np.fromfile(split / f"model.layers.1.attention.query_key_value.weight.{tp - 1}.bin", dtype=np.float32)
    torch.testing.assert_close(torch.from_numpy(last.reshape(H, 3, H // tp)), qkv[:, :, -H // tp:])
    dense = np.fromfile(split / "model.layers.0.mlp.dense_4h_to_h.weight.0.bin", dtype=np.float32)
    torch.testing.assert_close(torch.from_numpy(dense.reshape(FFN // tp, H)),
                               whole["model.layers.0.mlp.dense_4h_to_h.weight"][:FFN // tp])


def test_pytorch_model_bin_converts_like_safetensors(hf_model: GPT2LMHeadModel, hf_tp1: Path, tmp_path: Path) -> None:
    directory = tmp_path / "bin"
    directory.mkdir()
    hf_model.config.save_pretrained(directory)
    torch.save(hf_model.state_dict(), directory / "pytorch_model.bin")
    with pytest.warns(UserWarning, match="packaged GPT-2 tokenizer"):
        converted = convert(directory, tmp_path / "ft", progress=False)
    assert bin_files(converted) == bin_files(hf_tp1)
    assert (converted / "vocab.json").read_bytes() == (GPT2_TOKENIZER_DIR / "vocab.json").read_bytes()


def test_untied_hf_output_layer_is_written_as_lm_head(tmp_path: Path) -> None:
    model = random_hf_model(seed=2, tie_word_embeddings=False)
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    converted = convert(save_hf(model, tmp_path / "hf"), tmp_path / "ft", progress=False)
    config, weights = load_ft_weights(converted)
    assert "model.lm_head.weight" in weights
    ids = [40, 1842, 257, 922, 1110]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(reference_logits(config, weights, ids), expected, rtol=1e-5, atol=1e-5)


def test_hf_exact_gelu_is_refused(tmp_path: Path) -> None:
    directory = save_hf(random_hf_model(vocab_size=50257, activation_function="gelu"), tmp_path / "hf")
    with pytest.raises(CheckpointError, match="activation_function='gelu'"):
        convert(directory, tmp_path / "ft", progress=False)


# ---- .nemo ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_exact_model() -> GPT2LMHeadModel:
    model = random_hf_model(vocab_size=50304, seed=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    return model


def test_nemo_and_hf_of_the_same_weights_give_identical_files(fp16_exact_model: GPT2LMHeadModel,
                                                              tmp_path: Path) -> None:
    nemo = write_nemo(tmp_path / "m.nemo", nemo_config_for(fp16_exact_model),
                      [megatron_state_from_hf(fp16_exact_model)])
    from_nemo = convert(nemo, tmp_path / "from_nemo", weight_data_type="fp16", progress=False)
    from_hf = convert(save_hf(fp16_exact_model, tmp_path / "hf"), tmp_path / "from_hf", weight_data_type="fp16",
                      progress=False)
    nemo_files = bin_files(from_nemo)
    assert len(nemo_files) == 4 + 12 * LAYERS and nemo_files == bin_files(from_hf)
    nemo_config, hf_config = load_ft_weights(from_nemo)[0], load_ft_weights(from_hf)[0]
    assert (nemo_config.vocab_size, nemo_config.weight_data_type, nemo_config.layernorm_eps) == (50304, "fp16", 1e-5)
    assert nemo_config.start_id == nemo_config.end_id == 50256
    assert nemo_config.head_num == hf_config.head_num and nemo_config.inter_size == hf_config.inter_size


@pytest.mark.parametrize("infer_tp", [1, 2])
def test_nemo_trained_with_tp2_converts_like_tp1(fp16_exact_model: GPT2LMHeadModel, tmp_path: Path,
                                                 infer_tp: int) -> None:
    state = megatron_state_from_hf(fp16_exact_model)
    config = nemo_config_for(fp16_exact_model)
    tp1 = write_nemo(tmp_path / "tp1.nemo", config, [state])
    tp2 = write_nemo(tmp_path / "tp2.nemo", config, megatron_tp_shards(state, 2))
    with tarfile.open(tp2) as tar:
        assert {"./mp_rank_00/model_weights.ckpt", "./mp_rank_01/model_weights.ckpt"} <= set(tar.getnames())
    a = convert(tp1, tmp_path / "a", infer_gpu_num=infer_tp, weight_data_type="fp16", progress=False)
    b = convert(tp2, tmp_path / "b", infer_gpu_num=infer_tp, weight_data_type="fp16", progress=False)
    assert bin_files(a) == bin_files(b)


def test_megatron_amp_o2_names_convert_like_plain_names(fp16_exact_model: GPT2LMHeadModel, tmp_path: Path) -> None:
    state = megatron_state_from_hf(fp16_exact_model)
    wrapped = {k.replace("model.", "model.module.", 1): v for k, v in state.items()}  # megatron_amp_O2 naming
    config = nemo_config_for(fp16_exact_model)
    plain = convert(write_nemo(tmp_path / "a.nemo", config, [state]), tmp_path / "a", progress=False)
    amp = convert(write_nemo(tmp_path / "b.nemo", config, [wrapped]), tmp_path / "b", progress=False)
    assert bin_files(plain) == bin_files(amp)


def test_synthetic_tp2_archive_holds_the_tp1_weights(tiny_ft_dir: Path, tmp_path: Path) -> None:
    nemo = write_synthetic_checkpoint("tiny", tmp_path / "tiny_tp2.nemo", seed=0, tp=2)
    converted = convert(nemo, tmp_path / "ft", weight_data_type="fp16", progress=False)
    assert bin_files(converted) == bin_files(tiny_ft_dir)
    other_seed = convert(write_synthetic_checkpoint("tiny", tmp_path / "s1.nemo", seed=1), tmp_path / "s1",
                         weight_data_type="fp16", progress=False)
    assert bin_files(other_seed) != bin_files(tiny_ft_dir)


def test_tiny_preset_archive_layout(tiny_nemo: Path, tiny_ft_dir: Path) -> None:
    with tarfile.open(tiny_nemo) as tar:
        names = tar.getnames()
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml"))  # type: ignore[arg-type]
        weights = torch.load(io.BytesIO(tar.extractfile("./model_weights.ckpt").read()),  # type: ignore[union-attr]
                             weights_only=True)
    tokenizer = cfg["tokenizer"]
    assert tokenizer["library"] == "megatron" and tokenizer["type"] == "GPT2BPETokenizer"
    for key in ("vocab_file", "merge_file"):
        assert tokenizer[key].startswith("nemo:") and f"./{tokenizer[key][5:]}" in names
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["ffn_hidden_size"]) == (2, 64, 4,
                                                                                                         256)
    wte = weights["model.language_model.embedding.word_embeddings.weight"]
    assert wte.dtype == torch.float16 and tuple(wte.shape) == (50304, 64)
    qkv = weights["model.language_model.encoder.layers.0.self_attention.query_key_value.weight"]
    assert tuple(qkv.shape) == (3 * 64, 64)
    config, _ = load_ft_weights(tiny_ft_dir)
    assert (config.vocab_size, config.weight_data_type) == (50304, "fp16")


def test_extracted_nemo_folder_converts_like_the_archive(tiny_nemo: Path, tiny_ft_dir: Path, tmp_path: Path) -> None:
    with tarfile.open(tiny_nemo) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    converted = convert(tmp_path / "extracted", tmp_path / "ft", weight_data_type="fp16", progress=False)
    assert bin_files(converted) == bin_files(tiny_ft_dir)


def _tar_with(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("model_config.yaml")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"a: 1"[:3]))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


@pytest.mark.parametrize(("member", "message"), [
    ((_info("../escape.txt", size=2), b"hi"), "escapes the extraction folder"),
    ((_info("/etc/evil.txt", size=2), b"hi"), "absolute path"),
    ((_info("vocab.json", tarfile.SYMTYPE, link="/etc/passwd"), None), "symbolic link to '/etc/passwd'"),
    ((_info("merges.txt", tarfile.LNKTYPE, link="model_config.yaml"), None), "hard link"),
    ((_info("dev", tarfile.CHRTYPE), None), "device"),
    ((_info("model_weights.ckpt", size=65 * 2**30), None), "64 GiB limit"),
])
def test_unsafe_archive_members_are_refused(tmp_path: Path, member: tuple[tarfile.TarInfo, bytes | None],
                                            message: str) -> None:
    archive = _tar_with(tmp_path / "bad.nemo", member)
    with pytest.raises(CheckpointError, match=message) as caught:
        convert(archive, tmp_path / "out", progress=False)
    assert "refusing to extract" in caught.value.message
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "1-gpu").exists()


def test_mcore_checkpoint_gets_a_clear_error(tiny_nemo: Path, tmp_path: Path) -> None:
    config = GptModelConfig(head_num=4, size_per_head=16, inter_size=256, num_layer=2, vocab_size=50304,
                            max_pos_seq_len=128)
    mcore = {"model.embedding.word_embeddings.weight": torch.zeros(50304, 64),
             "model.decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros(192, 64)}
    archive = write_nemo(tmp_path / "mcore.nemo", nemo_model_config(config), [mcore])
    with pytest.raises(CheckpointError, match=r"Megatron-core \(mcore\) checkpoints are not supported yet"):
        convert(archive, tmp_path / "out", progress=False)


def test_non_tensor_pickles_are_refused(tmp_path: Path) -> None:
    config = GptModelConfig(head_num=4, size_per_head=16, inter_size=256, num_layer=2, vocab_size=50304,
                            max_pos_seq_len=128)
    not_a_tensor: dict = {"payload": Path("/tmp")}  # a pickled object weights_only must refuse
    archive = write_nemo(tmp_path / "pickle.nemo", nemo_model_config(config), [not_a_tensor])
    with pytest.raises(CheckpointError, match="weights-only"):
        convert(archive, tmp_path / "out", progress=False)


# ---- CLI ------------------------------------------------------------------------------------------------------


def test_cli_refuses_to_overwrite_without_force(tiny_nemo: Path, tmp_path: Path) -> None:
    args = ["convert", "--in-file", str(tiny_nemo), "--saved-dir", str(tmp_path), "--infer-gpu-num", "2",
            "--weight-data-type", "fp16"]
    first = CliRunner().invoke(builder_main, args)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "2-gpu" / "model.layers.1.attention.query_key_value.weight.1.bin").is_file()
    second = CliRunner().invoke(builder_main, args)
    assert second.exit_code != 0 and "already exists; pass --force" in second.output
    forced = CliRunner().invoke(builder_main, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2-gpu"]  # no scratch folders left behind


def test_cli_names_the_field_when_tp_does_not_divide_heads(tiny_nemo: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(builder_main, ["convert", "--in-file", str(tiny_nemo), "--saved-dir", str(tmp_path),
                                               "--infer-gpu-num", "3"])
    assert result.exit_code != 0
    assert "Error: --infer-gpu-num 3 does not divide head_num 4" in result.output
    assert not (tmp_path / "3-gpu").exists()


def test_checkpoint_cli_writes_a_convertible_archive(tmp_path: Path) -> None:
    out = tmp_path / "t.nemo"
    result = CliRunner().invoke(builder_main, ["checkpoint", "--preset", "tiny", "--out", str(out), "--tp", "2"])
    assert result.exit_code == 0, result.output
    again = CliRunner().invoke(builder_main, ["checkpoint", "--preset", "tiny", "--out", str(out)])
    assert again.exit_code != 0 and "--force" in again.output
    config, _ = load_ft_weights(convert(out, tmp_path / "ft", progress=False))
    assert (config.num_layer, config.hidden_size) == (2, 64)


# ---- the demo checkpoint ---------------------------------------------------------------------------------------


def _count(start: int, stop: int, *, first_bare: bool) -> list[int]:
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer(str(GPT2_TOKENIZER_DIR / "vocab.json"), str(GPT2_TOKENIZER_DIR / "merges.txt"))
    text = " ".join(str(n) for n in range(start, stop))
    return tokenizer.encode(text if first_bare else " " + text).ids


def test_demo_checkpoint_counts(demo_ft_dir: Path) -> None:
    config, weights = load_ft_weights(demo_ft_dir)
    assert (config.vocab_size, config.end_id, config.weight_data_type) == (50304, 50256, "fp16")
    prompt = _count(1, 7, first_bare=True)
    assert prompt == [16, 362, 513, 604, 642, 718]  # "1 2 3 4 5 6"
    assert reference_greedy(config, weights, prompt, 30) == _count(7, 37, first_bare=False)  # " 7 8 ... 36"
    for start, length in [(41, 3), (0, 2), (58, 8), (90, 5)]:
        prompt = _count(start, start + length, first_bare=True)
        expected = _count(start + length, start + length + 8, first_bare=False)
        assert reference_greedy(config, weights, prompt, 8) == expected, f"run from {start}"
