"""Tiny models and tokenizers built in code; nothing is downloaded."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def corpus_words(n: int = 250) -> list[str]:
    from pydoc_data.topics import topics

    words = Counter(w for text in topics.values() for w in text.split())
    return [w for w, _ in words.most_common(n)]


def make_tokenizer(path: Path, n_words: int = 250, bos: bool = False):
    """A word-level tokenizer over the most common pydoc words (ids 0..n_words+1); with ``bos``, id 2 is
    ``<bos>``, which the tokenizer puts before every text by default (as Gemma's and Llama 3's do), and the
    words take ids 3..n_words+2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **({"<bos>": 2} if bos else {})}
    for word in corpus_words(n_words):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = {"unk_token": "<unk>", "eos_token": "<eos>"}
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
        )
        specials["bos_token"] = "<bos>"
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tok.save_pretrained(path)
    return tok


def tiny_llama(vocab_size: int = 252, layers: int = 2, seed: int = 0, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab_size: int = 252, layers: int = 2, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=16,
        n_layer=layers,
        n_head=2,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_opt(vocab_size: int = 252, layers: int = 2, seed: int = 0):
    """A tiny OPT: its decoder layers flatten hidden states to (batch·tokens, d) before fc1 / fc2."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        ffn_dim=24,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=128,
        word_embed_proj_dim=16,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
        pad_token_id=1,
    )
    return OPTForCausalLM(config).eval()


def tiny_moe(family: str, vocab_size: int = 252, layers: int = 2, experts: int = 4, seed: int = 0):
    """A tiny mixture-of-experts model whose experts transformers packs into 3-D tensors: ``mixtral``,
    ``olmoe`` or ``qwen2_moe`` (its blocks also have a shared expert)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = {
        "vocab_size": vocab_size,
        "hidden_size": 16,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 64,
        "intermediate_size": 24,
    }
    if family == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**common, num_local_experts=experts)).eval()
    if family == "olmoe":
        return tf.OlmoeForCausalLM(tf.OlmoeConfig(**common, num_experts=experts)).eval()
    config = tf.Qwen2MoeConfig(
        **common, num_experts=experts, moe_intermediate_size=24, shared_expert_intermediate_size=24
    )
    return tf.Qwen2MoeForCausalLM(config).eval()


# The fast tests run torch on one thread: their matrices are tiny, so threads only add synchronisation (the
# Hutchinson tests ran 30 to 90 times faster on one thread on 2 busy cores). Set here, before any fixture,
# so that a module's shared runs and its tests' own runs sum in the same order (some compare bit for bit).
THREADS = torch.get_num_threads()
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _slow_tests_use_every_thread(request):
    """The slow tests run the 135M model, which does gain from threads."""
    if not request.node.get_closest_marker("slow"):
        yield
        return
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy machine OpenMP barriers cost ~40 ms per matmul."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_tied_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose LM head is its embedding (as SmolLM2's), vocabulary 252."""
    path = tmp_path_factory.mktemp("tiny-tied-llama")
    tiny_llama(tied=True).save_pretrained(path)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2().save_pretrained(path)
    make_tokenizer(path)
    return path


def random_blocks(n: int, seq_len: int, vocab: int = 252, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)
