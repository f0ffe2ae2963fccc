"""NeMo 1.x `.nemo` GPT checkpoints (legacy Megatron layout): safe extraction, reading, writing.

A `.nemo` is a tar holding `model_config.yaml`, the weights (`model_weights.ckpt`, or `mp_rank_XX/model_weights.ckpt`
per training tensor-parallel rank) and the tokenizer tables under hashed names that the yaml refers to as
`nemo:<name>`. A `.nemo` is untrusted input: members that could escape the extraction folder, links, devices and
absurd sizes are refused, the yaml is read with `yaml.safe_load` and the weights with `torch.load(weights_only=True)`,
memory-mapped so that converting a model never holds more than about one tensor of it in anonymous memory.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml

from builder.runtime.ft_weights import tensor_specs
from builder.runtime.model_config import GptModelConfig, ModelConfigError

from .megatron import (Shape, from_canonical, is_mcore_state_dict, megatron_key, strip_amp_o2_prefix,
                       to_canonical)
from .presets import NEMO_VOCAB_DIVISOR
from .source import END_OF_TEXT, PACKAGED_TOKENIZER, CheckpointError, TokenizerFiles

CONFIG_NAME = "model_config.yaml"
WEIGHTS_NAME = "model_weights.ckpt"
MAX_MEMBER_BYTES = 64 * 2**30
# The sum of all members: a 70B-parameter fp16 model (140 GB) fits; a tar whose headers claim more is refused.
MAX_TOTAL_BYTES = 256 * 2**30
COPY_CHUNK_BYTES = 2**20
MCORE_MESSAGE = ("Megatron-core (mcore) checkpoints are not supported yet: {what}. Export the model with "
                 "mcore_gpt=False (legacy Megatron names model.language_model.*) or convert it with NeMo's own tools")
RANK_DIR = re.compile(r"^(?:mp_rank_(\d{2})|tp_rank_(\d{2})_pp_rank_(\d{3}))$")


# ----------------------------------------------------------------------------------------------- extraction


def _gib(size: int) -> str:
    return f"{size // 2**30} GiB" if size % 2**30 == 0 else f"{size / 2**30:.1f} GiB"


def _bytes(size: int) -> str:
    return f"{size} bytes ({_gib(size)})" if size >= 2**30 else f"{size} bytes"


def _member_problem(member: tarfile.TarInfo, seen: set[str]) -> str | None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or member.name.startswith(("/", "\\")):
        return "absolute path"
    if ".." in path.parts:
        return "path escapes the extraction folder ('..')"
    if member.issym() or member.islnk():
        return f"{'symbolic' if member.issym() else 'hard'} link to {member.linkname!r}"
    if not (member.isfile() or member.isdir()):
        return "device, FIFO or other special file"
    if member.size > MAX_MEMBER_BYTES:
        return f"{member.size} bytes, more than the {_gib(MAX_MEMBER_BYTES)} limit per member"
    # A later duplicate would silently replace an earlier file (tar semantics); no real .nemo has one.
    if member.isfile() and path.as_posix() in seen:
        return "duplicate member name"
    seen.add(path.as_posix())
    return None


def _write_members(tar: tarfile.TarFile, members: Sequence[tarfile.TarInfo], dest: Path) -> None:
    """Extraction for Pythons whose tarfile lacks the "data" filter (before 3.10.12 / 3.11.4, unless the vendor
    backported it). Members were checked already (no links, devices, absolute paths or '..'); files are written
    0644 by us, never with the archive's modes or owners, and never through an existing link."""
    for member in members:
        target = dest.joinpath(*PurePosixPath(member.name).parts)
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as out:
            if source is not None:
                with source:
                    shutil.copyfileobj(source, out, COPY_CHUNK_BYTES)


def extract_nemo(archive: Path, dest: Path, *, max_total_bytes: int | None = None) -> None:
    """Extract a `.nemo` tar (plain or gzip) into `dest`, refusing the whole archive, before writing anything, if a
    member is unsafe or the members together exceed `max_total_bytes` (default `MAX_TOTAL_BYTES`) or the free
    space of `dest`."""
    limit = MAX_TOTAL_BYTES if max_total_bytes is None else max_total_bytes
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise CheckpointError(f"{archive}: not a readable .nemo (tar) archive: {err}") from err
    with tar:
        members: list[tarfile.TarInfo] = []
        seen: set[str] = set()
        total = 0
        free = shutil.disk_usage(dest).free
        try:
            # Headers are read one at a time: a bad member stops us before we seek past its (claimed) data, and in
            # a compressed archive before we inflate it.
            for member in tar:
                problem = _member_problem(member, seen)
                if problem is not None:
                    raise CheckpointError(f"{archive}: refusing to extract unsafe archive member "
                                          f"{member.name!r}: {problem}")
                total += member.size
                if total > limit:
                    raise CheckpointError(f"{archive}: refusing to extract: the members up to {member.name!r} "
                                          f"add up to {_bytes(total)}, more than the {_bytes(limit)} limit for a "
                                          f"whole .nemo")
                if total > free:
                    raise CheckpointError(f"{archive}: refusing to extract: the members up to {member.name!r} "
                                          f"add up to {_bytes(total)}, more than the {_bytes(free)} free in {dest}")
                members.append(member)
        except tarfile.TarError as err:
            raise CheckpointError(f"{archive}: corrupt .nemo (tar) archive: {err}") from err
        try:
            if hasattr(tarfile, "data_filter"):
                # The "data" filter re-checks paths and drops permission bits; our check gives the clearer message.
                tar.extractall(dest, members=members, filter="data")
            else:
                _write_members(tar, members, dest)
        except (tarfile.TarError, OSError) as err:
            raise CheckpointError(f"{archive}: extraction failed: {err}") from err


# ----------------------------------------------------------------------------------------------- reading


def _find_config(root: Path) -> Path:
    found = sorted(root.rglob(CONFIG_NAME))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise CheckpointError(f"{root}: {what} {CONFIG_NAME} found (a .nemo must hold exactly one)")
    return found[0]


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path}: unreadable YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a mapping at the top level")
    return loaded


def _positive_int(cfg: Mapping[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise CheckpointError(f"{path}: {key} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _check_supported_architecture(cfg: Mapping[str, Any], path: Path) -> None:
    """Refuse NeMo GPT variants that FT's GPT (and our engine) cannot compute, naming the yaml key."""
    if cfg.get("mcore_gpt"):
        raise CheckpointError(f"{path}: " + MCORE_MESSAGE.format(what="mcore_gpt is true"))
    supported: dict[str, tuple[Any, ...]] = {
        # Megatron's fused bias-GeLU (the default) is the tanh approximation FT computes.
        "activation": ("gelu",),
        "normalization": ("layernorm",),
        "position_embedding_type": ("learned_absolute",),
        "transformer_block_type": ("pre_ln",),
        "bias": (True,),
        "normalize_attention_scores": (True,),
        "headscale": (False,),
    }
    for key, allowed in supported.items():
        if key in cfg and cfg[key] not in allowed:
            raise CheckpointError(f"{path}: {key}={cfg[key]!r} is not supported (FasterTransformer GPT needs "
                                  f"{' or '.join(repr(a) for a in allowed)})")
    # NeMo's MLP (megatron/mlp.py) applies the fused bias-GeLU (tanh) only with bias_activation_fusion; unfused it
    # applies torch's exact erf GeLU, or the tanh one when openai_gelu is set, but only from NeMo 1.14 on (before, the
    # gelu branch came first), and the yaml does not say which release wrote it.
    if cfg.get("activation", "gelu") == "gelu" and cfg.get("bias_activation_fusion", True) is not True:
        raise CheckpointError(f"{path}: bias_activation_fusion={cfg['bias_activation_fusion']!r} is not supported: "
                              f"NeMo then computes the exact (erf) GeLU, and FasterTransformer GPT computes its tanh "
                              f"approximation (only bias_activation_fusion: true matches)")
    heads = cfg.get("num_attention_heads")
    groups = cfg.get("num_query_groups")
    if groups is not None and groups != heads:
        raise CheckpointError(f"{path}: num_query_groups={groups} (grouped-query attention) is not supported")
    if cfg.get("kv_channels") is not None and heads:
        if cfg["kv_channels"] * heads != cfg.get("hidden_size"):
            raise CheckpointError(f"{path}: kv_channels={cfg['kv_channels']} x num_attention_heads={heads} != "
                                  f"hidden_size={cfg.get('hidden_size')}; FasterTransformer needs them equal")


def _resolve_tokenizer(cfg: Mapping[str, Any], root: Path, path: Path) -> TokenizerFiles:
    section = cfg.get("tokenizer")
    if not isinstance(section, Mapping):
        warnings.warn(f"{path}: no tokenizer section; using the packaged GPT-2 tables", stacklevel=3)
        return PACKAGED_TOKENIZER
    library, kind = str(section.get("library", "")), str(section.get("type", ""))
    is_gpt2_bpe = (library == "megatron" and "GPT2" in kind) or (library == "huggingface" and "gpt2" in kind.lower())
    if not is_gpt2_bpe or section.get("model"):
        raise CheckpointError(f"{path}: tokenizer library={library!r} type={kind!r} is not supported; the served "
                              f"pipeline tokenizes with GPT-2 BPE (library: megatron, type: GPT2BPETokenizer)")

    def artifact(key: str, fallback_glob: str) -> Path | None:
        reference = section.get(key)
        if isinstance(reference, str) and reference:
            # "nemo:<hash>_vocab.json", "/artifacts/<name>" or a plain path: the archived file has that base name.
            name = PurePosixPath(reference.split("nemo:", 1)[-1]).name
            candidates = sorted(root.rglob(name))
            if candidates:
                return candidates[0]
        candidates = sorted(root.glob(fallback_glob))
        return candidates[0] if len(candidates) == 1 else None

    vocab, merges = artifact("vocab_file", "*vocab*.json"), artifact("merge_file", "*merges*.txt")
    if vocab is None or merges is None:
        warnings.warn(f"{root}: tokenizer files named in {CONFIG_NAME} are not in the archive; "
                      f"using the packaged GPT-2 tables", stacklevel=3)
        return PACKAGED_TOKENIZER
    return TokenizerFiles(vocab, merges)


def _weight_files(root: Path, training_tp: int, pipeline: int, path: Path) -> list[Path]:
    if pipeline != 1:
        raise CheckpointError(f"{path}: pipeline_model_parallel_size={pipeline} is not supported (only 1); "
                              f"merge the pipeline stages with NeMo first")
    rank_dirs: dict[int, Path] = {}
    for child in root.iterdir():
        match = RANK_DIR.match(child.name)
        if match and child.is_dir():
            if match.group(3) is not None and int(match.group(3)) != 0:
                raise CheckpointError(f"{root}: {child.name}: pipeline-parallel checkpoints are not supported")
            rank_dirs[int(match.group(1) or match.group(2))] = child
    if not rank_dirs:
        names = [root / WEIGHTS_NAME] if (root / WEIGHTS_NAME).is_file() else sorted(root.glob("*last.ckpt"))
        if not names:
            raise CheckpointError(f"{root}: no {WEIGHTS_NAME} (nor mp_rank_XX/{WEIGHTS_NAME}) in the checkpoint")
        if training_tp != 1:
            raise CheckpointError(f"{path}: tensor_model_parallel_size={training_tp} but the archive holds a single "
                                  f"weights file")
        return names[:1]
    if sorted(rank_dirs) != list(range(training_tp)):
        raise CheckpointError(f"{path}: tensor_model_parallel_size={training_tp} but the archive holds rank folders "
                              f"{sorted(d.name for d in rank_dirs.values())}")
    files = []
    for rank in range(training_tp):
        candidates = [rank_dirs[rank] / WEIGHTS_NAME] + sorted(rank_dirs[rank].glob("*last.ckpt"))
        existing = [c for c in candidates if c.is_file()]
        if not existing:
            raise CheckpointError(f"{rank_dirs[rank]}: no {WEIGHTS_NAME}")
        files.append(existing[0])
    return files


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """`torch.load` restricted to tensors (weights_only), memory-mapped where the file format allows."""
    try:
        try:
            loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Files from torch < 1.6 (legacy format) cannot be memory-mapped; they load whole.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises many types; all mean "not a plain tensor checkpoint"
        raise CheckpointError(f"{path}: cannot load as a weights-only PyTorch checkpoint "
                              f"(arbitrary pickles are refused): {err}") from err
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(loaded).__name__}")
    return {strip_amp_o2_prefix(str(k)): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


class NemoCheckpoint:
    """An extracted `.nemo` folder, read lazily tensor by tensor (implements `CheckpointSource`)."""

    def __init__(self, root: Path, model_name: str = "gpt") -> None:
        config_path = _find_config(root)
        root = config_path.parent
        cfg = _load_yaml(config_path)
        _check_supported_architecture(cfg, config_path)
        hidden = _positive_int(cfg, "hidden_size", config_path)
        heads = _positive_int(cfg, "num_attention_heads", config_path)
        if hidden % heads:
            raise CheckpointError(f"{config_path}: hidden_size={hidden} is not a multiple of "
                                  f"num_attention_heads={heads}")
        training_tp = _positive_int(cfg, "tensor_model_parallel_size", config_path, default=1)
        pipeline = _positive_int(cfg, "pipeline_model_parallel_size", config_path, default=1)
        self.files = _weight_files(root, training_tp, pipeline, config_path)
        self.ranks = [load_state_dict(f) for f in self.files]
        for file, state in zip(self.files, self.ranks):
            if is_mcore_state_dict(list(state)):
                example = next(k for k in state if "decoder." in k)
                raise CheckpointError(f"{file}: " + MCORE_MESSAGE.format(what=f"found {example!r}"))

        self.shape = Shape(head_num=heads, size_per_head=hidden // heads,
                           inter_size=_positive_int(cfg, "ffn_hidden_size", config_path, default=4 * hidden))
        legacy = cfg.get("megatron_legacy") or False  # absent or null: NeMo's default, False
        if not isinstance(legacy, bool):
            raise CheckpointError(f"{config_path}: megatron_legacy must be true or false, got {legacy!r}")
        self.legacy_qkv = legacy
        self.tokenizer = _resolve_tokenizer(cfg, root, config_path)
        end_id = self.tokenizer.token_id(END_OF_TEXT)
        embedding_key = megatron_key("model.wte")
        vocab_rows = sum(int(self._tensor(rank, embedding_key).shape[0]) for rank in range(len(self.ranks)))
        share = cfg.get("share_embeddings_and_output_weights", True)
        self.has_lm_head = not share
        try:
            self.config = GptModelConfig(
                head_num=heads, size_per_head=hidden // heads, inter_size=self.shape.inter_size,
                num_layer=_positive_int(cfg, "num_layers", config_path),
                vocab_size=vocab_rows,
                max_pos_seq_len=_positive_int(cfg, "max_position_embeddings", config_path,
                                              default=cfg.get("encoder_seq_length")),
                start_id=end_id, end_id=end_id,
                layernorm_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
                activation_type="Gelu", model_name=model_name)
        except ModelConfigError as err:
            raise CheckpointError(f"{config_path}: {err}") from err
        self._warn_unused_tensors()

    def _tensor(self, rank: int, key: str) -> torch.Tensor:
        try:
            return self.ranks[rank][key]
        except KeyError:
            raise CheckpointError(f"{self.files[rank]}: tensor {key!r} is missing") from None

    def _warn_unused_tensors(self) -> None:
        used = {megatron_key(s.stem) for s in tensor_specs(self.config, with_lm_head=self.has_lm_head)}
        unused = sorted(k for k in self.ranks[0] if k not in used and not k.endswith("_extra_state"))
        if unused:
            warnings.warn(f"{self.files[0]}: ignoring {len(unused)} tensor(s) the GPT layout does not use: "
                          f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}", stacklevel=3)

    def read(self, stem: str) -> torch.Tensor:
        key = megatron_key(stem)
        shards = [self._tensor(rank, key) for rank in range(len(self.ranks))]
        try:
            return to_canonical(stem, shards, self.shape, legacy_qkv=self.legacy_qkv)
        except RuntimeError as err:
            shapes = [list(s.shape) for s in shards]
            raise CheckpointError(f"{self.files[0]}: {key} has shard shapes {shapes}, which do not fit "
                                  f"{CONFIG_NAME} (hidden {self.shape.hidden}, heads {self.shape.head_num}, "
                                  f"ffn {self.shape.inter_size}): {err}") from err


# ----------------------------------------------------------------------------------------------- writing


def nemo_model_config(config: GptModelConfig, tensor_model_parallel_size: int = 1) -> dict[str, Any]:
    """A NeMo 1.x `MegatronGPTModel` model_config.yaml for `config`'s shape (tokenizer filled in by `write_nemo`)."""
    return {
        "micro_batch_size": 4,
        "global_batch_size": 8,
        "tensor_model_parallel_size": tensor_model_parallel_size,
        "pipeline_model_parallel_size": 1,
        "encoder_seq_length": config.max_pos_seq_len,
        "max_position_embeddings": config.max_pos_seq_len,
        "num_layers": config.num_layer,
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.inter_size,
        "num_attention_heads": config.head_num,
        "init_method_std": 0.02,
        "hidden_dropout": 0.1,
        "kv_channels": None,
        "apply_query_key_layer_scaling": True,
        "layernorm_epsilon": config.layernorm_eps,
        "make_vocab_size_divisible_by": NEMO_VOCAB_DIVISOR,
        "pre_process": True,
        "post_process": True,
        "persist_layer_norm": True,
        "bias": True,
        "activation": "gelu",
        "normalization": "layernorm",
        "position_embedding_type": "learned_absolute",
        "share_embeddings_and_output_weights": True,
        "megatron_amp_O2": False,
        "precision": 16,
        "target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
        "nemo_version": "1.11.0",
    }


def megatron_rank_state_dicts(tensors: Iterable[tuple[str, torch.Tensor]], config: GptModelConfig,
                              tp: int) -> list[dict[str, torch.Tensor]]:
    """(stem, canonical tensor) pairs -> one Megatron state dict per training TP rank, consumed one at a time."""
    shape = Shape(config.head_num, config.size_per_head, config.inter_size)
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for stem, tensor in tensors:
        for rank, shard in enumerate(from_canonical(stem, tensor, shape, tp)):
            ranks[rank][megatron_key(stem)] = shard
    return ranks


def _file_hash(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _reproducible(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Same weights, same bytes: no timestamps or owners in the archive.
    info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
    return info


def write_nemo(out: Path, model_config: Mapping[str, Any], rank_state_dicts: Sequence[Mapping[str, torch.Tensor]],
               tokenizer: TokenizerFiles = PACKAGED_TOKENIZER) -> Path:
    """Write a NeMo 1.x archive: yaml, `model_weights.ckpt` (or `mp_rank_XX/`), hashed tokenizer tables."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vocab_name = f"{_file_hash(tokenizer.vocab)}_vocab.json"
    merges_name = f"{_file_hash(tokenizer.merges)}_merges.txt"
    cfg = dict(model_config)
    cfg["tensor_model_parallel_size"] = len(rank_state_dicts)
    cfg["tokenizer"] = {"library": "megatron", "type": "GPT2BPETokenizer", "model": None,
                        "vocab_file": f"nemo:{vocab_name}", "merge_file": f"nemo:{merges_name}", "delimiter": None}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        staging = Path(scratch)
        (staging / CONFIG_NAME).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        shutil.copyfile(tokenizer.vocab, staging / vocab_name)
        shutil.copyfile(tokenizer.merges, staging / merges_name)
        if len(rank_state_dicts) == 1:
            weight_paths = [staging / WEIGHTS_NAME]
        else:
            weight_paths = [staging / f"mp_rank_{rank:02d}" / WEIGHTS_NAME for rank in range(len(rank_state_dicts))]
        for path, state in zip(weight_paths, rank_state_dicts):
            path.parent.mkdir(exist_ok=True)
            torch.save(dict(state), path)
        partial = staging / "archive.tar"
        with tarfile.open(partial, "w") as tar:
            for member in sorted(p for p in staging.rglob("*") if p.is_file() and p != partial):
                tar.add(member, arcname=f"./{member.relative_to(staging).as_posix()}", filter=_reproducible)
        partial.replace(out)
    return out

