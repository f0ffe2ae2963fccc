"""Named model shapes for synthetic checkpoints, and NeMo's vocabulary padding rule."""

from __future__ import annotations

from builder.runtime.model_config import GptModelConfig

GPT2_VOCAB = 50257  # GPT-2 BPE tokens; the rows past it are padding the tokenizer never produces
# NeMo's make_vocab_size_divisible_by default: rows are padded to a multiple of it times the training TP size.
NEMO_VOCAB_DIVISOR = 128


def nemo_padded_vocab(vocab: int, tensor_model_parallel_size: int, divisor: int = NEMO_VOCAB_DIVISOR) -> int:
    """Word-embedding rows of a NeMo model (MegatronBaseModel._vocab_size_with_padding): 50304 for GPT-2 at TP 1,
    50432 at TP 2, 50688 at TP 4."""
    multiple = divisor * tensor_model_parallel_size
    return -(-vocab // multiple) * multiple


PADDED_GPT2_VOCAB = nemo_padded_vocab(GPT2_VOCAB, 1)  # 50304

PRESETS: dict[str, GptModelConfig] = {
    # Seconds to write and convert: for tests. vocab_size is the TP-1 padding; `--tp N` pads further, as NeMo does.
    "tiny": GptModelConfig(head_num=4, size_per_head=16, inter_size=256, num_layer=2, vocab_size=PADDED_GPT2_VOCAB,
                           max_pos_seq_len=128, weight_data_type="fp16", model_name="tiny"),
    # The public nemo_gpt1.3B_fp16.nemo (docs/ft_contract.md §4).
    "gpt3-1.3b": GptModelConfig(head_num=16, size_per_head=128, inter_size=8192, num_layer=24,
                                vocab_size=PADDED_GPT2_VOCAB, max_pos_seq_len=2048, weight_data_type="fp16",
                                model_name="gpt3-1.3b"),
}
