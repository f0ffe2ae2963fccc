"""The demo checkpoint: a tiny GPT trained here, on the CPU, to continue runs of consecutive integers.

"1 2 3 4 5 6" + 30 greedy tokens -> " 7 8 9 ... 36", so the seed example is answered offline on a fresh machine.

Recipe: an HF `GPT2LMHeadModel` (2 layers, width 128) learns from random runs "s s+1 s+2 ..." (s in 0..199, first
number without a leading space, like a typed prompt; after 199 comes <|endoftext|>). Every number below 200 is a single
GPT-2 token with and without a leading space, so only ~400 token ids ever occur. Training therefore runs over a compact
vocabulary (those ids, <|endoftext|> and one "never seen" row), which keeps the softmax small enough for a CPU; the
export scatters the rows back into the padded 50304-row GPT-2 embedding and fills every other row with the learnt
"never seen" row, whose logit training pushed down. Tied embeddings, tanh GeLU, layernorm eps 1e-5: exactly the
NeMo GPT-3 math. Training runs single-threaded with a seeded generator, so the result is the same on every run; it
is cached under `$GPT_TRITON_CACHE` (default `~/.cache/gpt-triton`) keyed by a hash of the recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from builder.runtime.ft_weights import tensor_specs
from builder.runtime.model_config import GptModelConfig

from .hf import hf_config_from_canonical, hf_key, hf_model_from_canonical, hf_to_canonical
from .nemo import megatron_rank_state_dicts, nemo_model_config, write_nemo
from .presets import PADDED_GPT2_VOCAB
from .source import END_OF_TEXT, PACKAGED_TOKENIZER

CACHE_ENV = "GPT_TRITON_CACHE"


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that determines the trained weights; its hash names the cached file."""

    version: int = 1
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_inner: int = 512
    n_positions: int = 128
    max_number: int = 199
    batch_size: int = 16
    steps: int = 250
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    seed: int = 1234

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


RECIPE = DemoRecipe()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gpt-triton").expanduser()


def number_token_ids(max_number: int) -> tuple[list[int], list[int]]:
    """GPT-2 ids of "0".."max" and " 0".." max"; each must be a single token."""
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer(str(PACKAGED_TOKENIZER.vocab), str(PACKAGED_TOKENIZER.merges))
    bare: list[int] = []
    spaced: list[int] = []
    for n in range(max_number + 1):
        for text, into in ((str(n), bare), (f" {n}", spaced)):
            ids = tokenizer.encode(text).ids
            if len(ids) != 1:
                raise RuntimeError(f"{text!r} is {len(ids)} GPT-2 tokens; the demo recipe needs single tokens")
            into.append(ids[0])
    return bare, spaced


@dataclass(frozen=True)
class CompactVocab:
    """Training ids: 0 = <|endoftext|>, 1 = "never seen", then bare numbers, then space-prefixed numbers."""

    gpt2_ids: list[int]  # compact id -> GPT-2 id (entry 1, the "never seen" row, has none: -1)
    max_number: int

    END, UNSEEN = 0, 1

    def bare(self, n: int) -> int:
        return 2 + n

    def spaced(self, n: int) -> int:
        return 3 + self.max_number + n


def compact_vocab(max_number: int) -> CompactVocab:
    bare, spaced = number_token_ids(max_number)
    end_id = PACKAGED_TOKENIZER.token_id(END_OF_TEXT)
    return CompactVocab([end_id, -1, *bare, *spaced], max_number)


def training_batch(recipe: DemoRecipe, vocab: CompactVocab, generator: torch.Generator) -> torch.Tensor:
    """[batch, n_positions] compact ids: runs from random starts, <|endoftext|> after max_number, -100 after that."""
    starts = torch.randint(0, recipe.max_number + 1, (recipe.batch_size,), generator=generator)
    batch = torch.full((recipe.batch_size, recipe.n_positions), -100, dtype=torch.long)
    for row, start in enumerate(starts.tolist()):
        numbers = range(start, min(start + recipe.n_positions, recipe.max_number + 1))
        ids = [vocab.bare(start)] + [vocab.spaced(n) for n in numbers[1:]]
        if len(ids) < recipe.n_positions:
            ids.append(vocab.END)
        batch[row, :len(ids)] = torch.tensor(ids)
    return batch


@contextmanager
def _single_threaded() -> Iterator[None]:
    # Reductions split over threads round differently; one thread makes the weights identical on every machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(recipe: DemoRecipe = RECIPE) -> tuple[GptModelConfig, dict[str, torch.Tensor]]:
    """Train the counting model; returns the full-vocabulary canonical tensors (fp32)."""
    from transformers import GPT2LMHeadModel

    vocab = compact_vocab(recipe.max_number)
    config = GptModelConfig(head_num=recipe.n_head, size_per_head=recipe.n_embd // recipe.n_head,
                            inter_size=recipe.n_inner, num_layer=recipe.n_layer, vocab_size=len(vocab.gpt2_ids),
                            max_pos_seq_len=recipe.n_positions, start_id=vocab.END, end_id=vocab.END,
                            model_name="counting-demo")
    with _single_threaded():
        torch.manual_seed(recipe.seed)
        generator = torch.Generator().manual_seed(recipe.seed)
        model = GPT2LMHeadModel(hf_config_from_canonical(config)).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / recipe.warmup_steps) * (1 - step / recipe.steps))
        # About a minute on a CPU, once per cache: say so, or the first `demo` looks hung.
        steps = tqdm(range(recipe.steps), desc="training the counting demo model (first run only; cached)",
                     unit="step", file=sys.stderr)
        for step in steps:
            batch = training_batch(recipe, vocab, generator)
            inputs = batch.clamp(min=0)  # padding positions are masked out of the loss by their -100 labels
            logits = model(input_ids=inputs).logits  # [batch, positions, compact vocab]
            loss = torch.nn.functional.cross_entropy(  # position t predicts token t + 1
                logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 10 == 0 or step == recipe.steps - 1:
                steps.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    state = {k.removeprefix("transformer."): v.detach() for k, v in model.state_dict().items()}
    compact = {spec.stem: hf_to_canonical(spec.stem, state[hf_key(spec.stem)], config.hidden_size)
               for spec in tensor_specs(config)}
    full_config = dataclasses.replace(config, vocab_size=PADDED_GPT2_VOCAB, start_id=vocab.gpt2_ids[vocab.END],
                                      end_id=vocab.gpt2_ids[vocab.END])
    wte = compact["model.wte"][vocab.UNSEEN].repeat(PADDED_GPT2_VOCAB, 1)  # [V, H]: every id starts "never seen"
    used = [i for i, gpt2_id in enumerate(vocab.gpt2_ids) if gpt2_id >= 0]
    wte[torch.tensor([vocab.gpt2_ids[i] for i in used])] = compact["model.wte"][torch.tensor(used)]
    return full_config, {**compact, "model.wte": wte}


def greedy_continuation(model: torch.nn.Module, prompt_ids: Sequence[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([list(prompt_ids)])
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = model(input_ids=ids, logits_to_keep=1).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


def counting_failures(model: torch.nn.Module, cases: Sequence[tuple[int, int]] = ((1, 6), (41, 3), (0, 2),
                      (17, 8), (63, 5), (88, 4)), new_tokens: int = 30) -> list[str]:
    """Greedy-decode runs "s s+1 ... s+len-1" and report those that do not continue correctly."""
    bare, spaced = number_token_ids(RECIPE.max_number)
    failures = []
    for start, length in cases:
        prompt = [bare[start]] + [spaced[n] for n in range(start + 1, start + length)]
        expected = [spaced[n] for n in range(start + length, start + length + new_tokens)]
        got = greedy_continuation(model, prompt, new_tokens)
        if got != expected:
            failures.append(f"run from {start} (length {length}): got ids {got}, expected {expected}")
    return failures


def build_demo_nemo(out: Path, recipe: DemoRecipe = RECIPE) -> Path:
    """Train, export as an fp16 NeMo 1.x archive, and check that the fp16 weights still count."""
    config, tensors = train(recipe)
    fp16 = {stem: t.to(torch.float16) for stem, t in tensors.items()}
    failures = counting_failures(hf_model_from_canonical(config, fp16).eval())
    if failures:
        raise RuntimeError("the demo recipe did not learn to count:\n" + "\n".join(failures))
    return write_nemo(out, nemo_model_config(config), megatron_rank_state_dicts(fp16.items(), config, 1))


def demo_checkpoint(out: str | Path | None = None) -> Path:
    """The cached demo `.nemo` (trained on first use, ~1 minute); copied to `out` when given (overwriting it)."""
    cached = cache_dir() / f"demo-counting-{RECIPE.digest}.nemo"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".demo-") as scratch:
            built = build_demo_nemo(Path(scratch) / cached.name)
            built.replace(cached)  # atomic: concurrent first calls each build, the last rename wins
    if out is None:
        return cached
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out)
    return out
