"""A tiny Llama, built offline and reproducibly, so the quickstart and the tests need no hub access.

`build_tiny_base` trains a byte-level BPE tokenizer and pretrains a ~1M-parameter Llama on the
committed corpus in `corpus/` (general prose plus unlabeled customer-support messages, as domain
pretraining; the messages come from the quickstart's training templates only, so none of its held-out
tickets' sentences is pretraining text). `build_random_tiny` makes an untrained, even smaller model
for fast tests.

    python -m kubetune_components.dev.tinylm --out DIR [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kubetune_components.common import storage
from kubetune_components.common.errors import ConfigError

RECIPE_VERSION = 1
MARKER_FILE = "kubetune-tinylm.json"
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
CORPUS_FILES = ("corpus-general.txt", "corpus-support.txt")

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
DEFAULT_VOCAB_SIZE = 1024

# transformers renders chat templates with trim_blocks, so newlines are written as expressions.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512


@dataclass(frozen=True)
class PretrainingRecipe:
    steps: int = 280
    batch_size: int = 8
    sequence_length: int = 256
    peak_learning_rate: float = 2e-3
    final_learning_rate: float = 2e-4
    warmup_steps: int = 20
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    threads: int = 2


RANDOM_SHAPE = TinyShape(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
)
BASE_SHAPE = TinyShape(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384
)
SMALL_SHAPE = TinyShape(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192
)
TINY_SIZES: dict[str, TinyShape] = {"base": BASE_SHAPE, "small": SMALL_SHAPE}
"""Sizes of the pretrained tiny Llama: base (the quickstart's) and small (under a third of its parameters,
same tokenizer and corpus: a student to distil the base or a model tuned from it into)."""
DEFAULT_SIZE = "base"
BASE_RECIPE = PretrainingRecipe()

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def corpus_paths() -> list[Path]:
    return [CORPUS_DIR / name for name in CORPUS_FILES]


def corpus_documents(paths: Sequence[Path] | None = None) -> list[str]:
    """The corpus split into paragraphs, the unit the tokenizer and the pretraining loop see."""
    documents: list[str] = []
    for path in paths if paths is not None else corpus_paths():
        text = path.read_text(encoding="utf-8")
        documents.extend(paragraph.strip() for paragraph in text.split("\n\n") if paragraph.strip())
    if not documents:
        raise ConfigError("the tiny-model corpus is empty")
    return documents


def build_tiny_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE, documents: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (deterministic for the same documents) and wrap it for transformers.

    Byte-level means every string is encodable, so `<unk>` exists only because tooling expects it.
    Encoding adds `<s>` in front; responses end with `</s>`; `<pad>` is a separate token.
    """
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    training_text = list(documents) if documents is not None else corpus_documents()
    backend.train_from_iterator(training_text, trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=BASE_SHAPE.max_position_embeddings,
    )


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, shape: TinyShape) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _new_model(tokenizer: PreTrainedTokenizerFast, shape: TinyShape, seed: int) -> LlamaForCausalLM:
    config = tiny_llama_config(tokenizer, shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def build_random_tiny(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    hidden_size: int = RANDOM_SHAPE.hidden_size,
    num_hidden_layers: int = RANDOM_SHAPE.num_hidden_layers,
    num_attention_heads: int = RANDOM_SHAPE.num_attention_heads,
    num_key_value_heads: int = RANDOM_SHAPE.num_key_value_heads,
    intermediate_size: int = RANDOM_SHAPE.intermediate_size,
) -> Path:
    """An untrained tiny Llama plus the tiny tokenizer, saved with save_pretrained (for tests)."""
    shape = TinyShape(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
    )
    tokenizer = build_tiny_tokenizer(vocab_size)
    model = _new_model(tokenizer, shape, seed)
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_recipe(seed: int = 0, size: str = DEFAULT_SIZE) -> dict[str, Any]:
    """Everything that determines the tiny base; its hash decides whether a build is reusable."""
    recipe: dict[str, Any] = {
        "version": RECIPE_VERSION,
        "seed": seed,
        "vocabSize": DEFAULT_VOCAB_SIZE,
        "specialTokens": list(SPECIAL_TOKENS),
        "chatTemplate": CHAT_TEMPLATE,
        "shape": asdict(TINY_SIZES[size]),
        "pretraining": asdict(BASE_RECIPE),
        "corpus": {path.name: _sha256_file(path) for path in corpus_paths()},
    }
    if size != DEFAULT_SIZE:
        recipe["size"] = size  # only then: the default build's recipe and hash stay as they were
    return recipe


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((out_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete_build(out_dir: Path, expected_hash: str) -> bool:
    marker = read_marker(out_dir)
    if marker is None or marker.get("recipeHash") != expected_hash:
        return False
    return all((out_dir / name).is_file() for name in marker.get("files", []))


def _pack_blocks(documents: list[list[int]], block: int, rng: random.Random) -> list[list[int]]:
    order = list(range(len(documents)))
    rng.shuffle(order)
    stream = [token for index in order for token in documents[index]]
    return [stream[start : start + block] for start in range(0, len(stream) - block + 1, block)]


def _learning_rate(step: int, recipe: PretrainingRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.peak_learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return recipe.final_learning_rate + (recipe.peak_learning_rate - recipe.final_learning_rate) * cosine


def pretrain(
    model: LlamaForCausalLM,
    documents: list[list[int]],
    recipe: PretrainingRecipe,
    *,
    seed: int,
    log: Log = _quiet,
) -> float:
    """Causal-LM pretraining on packed blocks of documents; returns the mean loss of the last 20 steps."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.peak_learning_rate, betas=(0.9, 0.95), weight_decay=recipe.weight_decay
    )
    model.train()
    blocks: list[list[int]] = []
    recent: list[float] = []
    for step in range(recipe.steps):
        if len(blocks) < recipe.batch_size:
            blocks = _pack_blocks(documents, recipe.sequence_length, rng)
            if len(blocks) < recipe.batch_size:
                raise ConfigError("the corpus is too small for one pretraining batch")
        batch = torch.tensor([blocks.pop() for _ in range(recipe.batch_size)], dtype=torch.long)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, recipe)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = [*recent[-19:], float(loss.item())]
        if step % 40 == 0 or step == recipe.steps - 1:
            log(f"step {step + 1}/{recipe.steps} loss {loss.item():.3f}")
    model.eval()
    return sum(recent) / len(recent)


def build_tiny_base(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    force: bool = False,
    log: Log = _quiet,
    size: str = DEFAULT_SIZE,
) -> Path:
    """Tokenizer + a pretrained tiny Llama of `size` (TINY_SIZES) in `out_dir`; reuses a complete build of
    the same recipe. Every size has the same tokenizer and pretraining corpus.

    The build happens in a temporary sibling directory that is renamed into place at the end, so
    `out_dir` never holds a partial model. A directory that is not a tiny-model build is never
    replaced unless `force` is set.
    """
    target = Path(out_dir)
    if size not in TINY_SIZES:
        raise ConfigError(f"size {size!r} is not one of {', '.join(TINY_SIZES)}")
    recipe = base_recipe(seed, size)
    expected_hash = recipe_hash(recipe)
    if not force and is_complete_build(target, expected_hash):
        log(f"{target} already holds the tiny base (recipe {expected_hash[:12]}); nothing to do")
        return target
    if target.exists() and not force and read_marker(target) is None and any(target.iterdir()):
        raise ConfigError(f"{target} exists and is not a tiny-model build; pass force to replace it")

    started = time.monotonic()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(BASE_RECIPE.threads)
    try:
        tokenizer = build_tiny_tokenizer(DEFAULT_VOCAB_SIZE)
        eos_id = int(tokenizer.eos_token_id)
        documents = [[*tokenizer(text)["input_ids"], eos_id] for text in corpus_documents()]
        model = _new_model(tokenizer, TINY_SIZES[size], seed)
        parameters = parameter_count(model)
        log(f"pretraining a {parameters:,}-parameter Llama on {sum(map(len, documents)):,} corpus tokens")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            final_loss = pretrain(model, documents, BASE_RECIPE, seed=seed, log=log)
    finally:
        torch.set_num_threads(previous_threads)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = sorted(path.name for path in staging.iterdir() if path.is_file())
        storage.atomic_write_json(
            staging / MARKER_FILE,
            {
                "recipeHash": expected_hash,
                "recipe": recipe,
                "parameters": parameters,
                "finalTrainLoss": round(final_loss, 4),
                "buildSeconds": round(time.monotonic() - started, 1),
                "files": files,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            },
        )
        if not force and is_complete_build(target, expected_hash):
            # A concurrent builder finished first with the same recipe; keep its (identical) build.
            log(f"{target} was completed by another builder meanwhile; keeping it")
            return target
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"built the tiny base in {target} in {time.monotonic() - started:.1f}s (final loss {final_loss:.3f})")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny pretrained Llama used by the quickstart.")
    parser.add_argument("--out", required=True, type=Path, help="directory to write the model to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    parser.add_argument("--size", choices=sorted(TINY_SIZES), default=DEFAULT_SIZE, help="model size")
    parser.add_argument("--random", action="store_true", help="write an untrained tiny model instead (tests)")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    try:
        if args.random:
            build_random_tiny(args.out, seed=args.seed)
            print(f"wrote an untrained tiny Llama to {args.out}")
        else:
            build_tiny_base(args.out, seed=args.seed, force=args.force, log=print, size=args.size)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
