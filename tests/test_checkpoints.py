"""Checkpoint conversion: HF GPT-2 and .nemo -> FT weights, TP re-splitting, untrusted input, the demo model.

The oracle is HF `GPT2LMHeadModel` (the same math as NeMo GPT-3). The Megatron layout the .nemo files use is built
here by hand from the HF weights, following Megatron's rules, independently of the converter's code.
"""

from __future__ import annotations

import io
import json
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


def _sharded_hf(model: GPT2LMHeadModel, directory: Path) -> Path:
    model.save_pretrained(directory, max_shard_size="200KB")  # several model-0000x-of-0000n.safetensors + an index
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(GPT2_TOKENIZER_DIR / name, directory / name)
    assert (directory / "model.safetensors.index.json").is_file() and len(list(directory.glob("*.safetensors"))) > 1
    return directory


def _repoint_first_shard(directory: Path, target: str) -> None:
    """Point every weight_map entry of the first shard at `target`."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


def test_sharded_hf_index_converts_like_one_file(hf_model: GPT2LMHeadModel, hf_tp1: Path, tmp_path: Path) -> None:
    converted = convert(_sharded_hf(hf_model, tmp_path / "hf"), tmp_path / "ft", progress=False)
    assert bin_files(converted) == bin_files(hf_tp1)


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_hf_index_shards_outside_the_folder_are_refused(hf_model: GPT2LMHeadModel, tmp_path: Path,
                                                       escape: str) -> None:
    directory = _sharded_hf(hf_model, tmp_path / "hf")
    first = sorted(directory.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"  # a real shard, so following the path would convert fine
    first.rename(outside)
    if escape == "symlink":
        first.symlink_to(outside)  # the index keeps naming the in-folder file, which is a link out of the folder
        named = first.name
    else:
        named = "../elsewhere.safetensors" if escape == "dotdot" else str(outside)
        _repoint_first_shard(directory, named)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder") as caught:
        convert(directory, tmp_path / "ft", progress=False)
    assert "model.safetensors.index.json: weight_map names " + repr(named) in caught.value.message
    assert not (tmp_path / "ft" / "1-gpu").exists()


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


def megatron_legacy_rank_states(model: GPT2LMHeadModel, tp: int) -> list[dict[str, torch.Tensor]]:
    """The Megatron state of `megatron_tp_shards`, except that each rank's fused QKV follows NeMo's
    `megatron_legacy: true`: output rows [q of the rank's heads | their k | their v] (ParallelAttention undoes it with
    `_transpose_last_dim(mixed_x_layer, 3, True)`: view [3, heads_local, d], swap to [heads_local, 3, d])."""
    ranks = megatron_tp_shards(megatron_state_from_hf(model), tp)
    sd = {k.removeprefix("transformer."): v.detach() for k, v in model.state_dict().items()}
    local = H // tp
    for i in range(LAYERS):
        w_q, w_k, w_v = sd[f"h.{i}.attn.c_attn.weight"].split(H, dim=1)  # each [in, out]
        b_q, b_k, b_v = sd[f"h.{i}.attn.c_attn.bias"].split(H)
        key = f"model.language_model.encoder.layers.{i}.self_attention.query_key_value."
        for rank, state in enumerate(ranks):
            cols = slice(rank * local, (rank + 1) * local)
            state[key + "weight"] = torch.cat([w_q[:, cols].T, w_k[:, cols].T, w_v[:, cols].T]).half().contiguous()
            state[key + "bias"] = torch.cat([b_q[cols], b_k[cols], b_v[cols]]).half()
    return ranks


@pytest.mark.parametrize("training_tp", [1, 2])
def test_megatron_legacy_qkv_converts_like_the_interleaved_layout(fp16_exact_model: GPT2LMHeadModel, tmp_path: Path,
                                                                  training_tp: int) -> None:
    config = nemo_config_for(fp16_exact_model)
    plain = write_nemo(tmp_path / "plain.nemo", config, [megatron_state_from_hf(fp16_exact_model)])
    legacy_ranks = megatron_legacy_rank_states(fp16_exact_model, training_tp)
    legacy = write_nemo(tmp_path / "legacy.nemo", config | {"megatron_legacy": True}, legacy_ranks)
    for infer_tp in (1, 2):
        expected = convert(plain, tmp_path / "plain", infer_gpu_num=infer_tp, weight_data_type="fp16", progress=False)
        converted = convert(legacy, tmp_path / "legacy", infer_gpu_num=infer_tp, weight_data_type="fp16",
                            progress=False)
        assert bin_files(converted) == bin_files(expected), f"infer TP {infer_tp}"
    # The same tensors without the flag are another (scrambled) model: the flag is what makes them convert right.
    unflagged = convert(write_nemo(tmp_path / "unflagged.nemo", config, legacy_ranks), tmp_path / "unflagged",
                        weight_data_type="fp16", progress=False)
    assert bin_files(unflagged) != bin_files(tmp_path / "plain" / "1-gpu")


def test_unfused_exact_gelu_nemo_is_refused(fp16_exact_model: GPT2LMHeadModel, tmp_path: Path) -> None:
    state, config = megatron_state_from_hf(fp16_exact_model), nemo_config_for(fp16_exact_model)
    for extra in ({"bias_activation_fusion": False}, {"bias_activation_fusion": False, "openai_gelu": True}):
        archive = write_nemo(tmp_path / "erf.nemo", config | extra, [state])
        with pytest.raises(CheckpointError, match=r"bias_activation_fusion=False is not supported: NeMo then "
                                                  r"computes the exact \(erf\) GeLU"):
            convert(archive, tmp_path / "out", progress=False)
        assert not (tmp_path / "out" / "1-gpu").exists()
    fused = write_nemo(tmp_path / "fused.nemo", config | {"bias_activation_fusion": True}, [state])
    config_ini = load_ft_weights(convert(fused, tmp_path / "fused", progress=False))[0]
    assert config_ini.activation_type == "Gelu"  # FT's Gelu: the tanh approximation the fused kernel computes


def test_synthetic_tp2_archive_pads_the_vocabulary_like_nemo(tiny_ft_dir: Path, tmp_path: Path) -> None:
    """NeMo pads the word embeddings to a multiple of 128 x training TP (50432 rows for GPT-2 at TP 2); the extra
    rows are kept (as FT's converter does) and never generated (vocab_limit = the tokenizer's 50257 ids)."""
    nemo = write_synthetic_checkpoint("tiny", tmp_path / "tiny_tp2.nemo", seed=0, tp=2)
    with tarfile.open(nemo) as tar:
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml"))
        shard = torch.load(io.BytesIO(tar.extractfile("./mp_rank_01/model_weights.ckpt").read()),
                           weights_only=True)
    assert (cfg["tensor_model_parallel_size"], cfg["make_vocab_size_divisible_by"]) == (2, 128)
    assert tuple(shard["model.language_model.embedding.word_embeddings.weight"].shape) == (50432 // 2, 64)
    tp1_config, tp1 = load_ft_weights(tiny_ft_dir)
    for infer_tp in (1, 2):
        converted = convert(nemo, tmp_path / "ft", infer_gpu_num=infer_tp, weight_data_type="fp16", progress=False)
        config, weights = load_ft_weights(converted)
        assert (config.vocab_size, config.tensor_para_size) == (50432, infer_tp)
        assert weights.keys() == tp1.keys()
        for stem, tensor in tp1.items():  # the TP-1 archive's weights, plus padding rows
            torch.testing.assert_close(weights[stem][:tensor.shape[0]], tensor, rtol=0, atol=0)
        ids = [464, 2068, 7586, 21831, 18045]
        torch.testing.assert_close(reference_logits(config, weights, ids)[:, :50304],
                                   reference_logits(tp1_config, tp1, ids), rtol=1e-5, atol=1e-5)
    # The served engine, on the converted folders: the same greedy tokens from the TP-2 and TP-1 trainings.
    from builder.runtime.core_io import GenerationRequest
    from builder.runtime.generation import GptEngine

    def greedy(ft_dir: Path) -> list[list[int]]:
        engine = GptEngine.from_ft_dir(ft_dir, device="cpu", dtype=torch.float32, max_batch_size=2,
                                       vocab_limit=50257)
        rows = [GenerationRequest(input_ids=(464, 2068, 7586), output_len=12, end_id=50256),
                GenerationRequest(input_ids=(40, 1842, 257, 922), output_len=12, end_id=50256)]
        return [out.beams[0].tolist() for out in engine.generate(rows)]

    assert greedy(converted) == greedy(tiny_ft_dir)
    other_seed = convert(write_synthetic_checkpoint("tiny", tmp_path / "s1.nemo", seed=1), tmp_path / "s1",
                         weight_data_type="fp16", progress=False)
    assert bin_files(other_seed) != bin_files(tiny_ft_dir)


def test_tiny_preset_archive_layout(tiny_nemo: Path, tiny_ft_dir: Path) -> None:
    with tarfile.open(tiny_nemo) as tar:
        names = tar.getnames()
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml"))
        weights = torch.load(io.BytesIO(tar.extractfile("./model_weights.ckpt").read()),
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
