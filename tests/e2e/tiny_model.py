"""Build a tiny random-weight Llama model that real vLLM can serve, with no downloads.

Run with the python of the vLLM venv (it has torch, transformers and tokenizers):

    python tests/e2e/tiny_model.py OUT_DIR

The weights are random, so the text is gibberish, but it is a real LlamaForCausalLM with a
real (locally trained) byte-level BPE tokenizer and a ChatML-like chat template: vLLM
loads it like any Hugging Face checkpoint, chat requests go through the template, and
temperature 0 makes the output deterministic. Everything is seeded, so two builds give
the same files.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

# Nothing here may reach the network: set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEED = 0
VOCAB_SIZE = 2048
MAX_POSITIONS = 4096
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML, as used by many open chat models; vLLM renders it for /v1/chat/completions.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a model request engine token stream proxy wake sleep idle start stop cold warm "
    "answer question hello world server client queue pool memory weight layer cache batch "
    "prompt reply chat system user assistant time second minute fast slow small large one "
    "two three four five six seven eight nine ten and or but not with from into over under"
).split()


def _corpus(*, lines: int) -> list[str]:
    """Deterministic English-ish text: enough merges to fill a ~2k vocabulary."""
    rng = random.Random(SEED)
    text = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 9999)))
        text.append(" ".join(words).capitalize() + rng.choice(".?!,;:"))
    return text


def build_tokenizer(out_dir: Path) -> int:
    """Train a byte-level BPE tokenizer, save it to `out_dir`; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(lines=4000), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=MAX_POSITIONS,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(out_dir)
    return int(tokenizer.get_vocab_size())


def build_model(out_dir: Path, *, vocab_size: int, eos_token_id: int, bos_token_id: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)


def build(out_dir: Path) -> Path:
    """Write tokenizer, config and weights into `out_dir` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(out_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    build_model(
        out_dir,
        vocab_size=vocab_size,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    print(build(args.out_dir))


if __name__ == "__main__":
    main()
