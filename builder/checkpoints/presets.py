"""Named model shapes for synthetic checkpoints."""

from __future__ import annotations

from builder.runtime.model_config import GptModelConfig

# GPT-2 BPE: 50257 tokens, padded by NeMo to a multiple of 128.
PADDED_GPT2_VOCAB = 50304

PRESETS: dict[str, GptModelConfig] = {
    # Seconds to write and convert: for tests.
    "tiny": GptModelConfig(head_num=4, size_per_head=16, inter_size=256, num_layer=2, vocab_size=PADDED_GPT2_VOCAB,
                           max_pos_seq_len=128, weight_data_type="fp16", model_name="tiny"),
    # The public nemo_gpt1.3B_fp16.nemo (reference/ft_backend.md section 4).
    "gpt3-1.3b": GptModelConfig(head_num=16, size_per_head=128, inter_size=8192, num_layer=24,
                                vocab_size=PADDED_GPT2_VOCAB, max_pos_seq_len=2048, weight_data_type="fp16",
                                model_name="gpt3-1.3b"),
}
