"""Shared fixtures: tiny models built from configs with random weights, and a tiny tokenizer.

Nothing here touches the network. Two architectures cover the two layouts the package must handle:
GPT-2 (``Conv1D`` layers, q/k/v fused in ``c_attn``) and Llama (``nn.Linear`` layers, grouped-query
attention with fewer key/value heads than query heads).
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PEFT_LAB_QUICK", "1")

WORDS = (
    "[PAD] [UNK] [BOS] [EOS] review sentiment positive negative the a film was great bad "
    "not good terrible loved hated it . , : is of capital france paris water boils at 100 "
    "degrees and i this movie food app book hotel very really quite but so Review Sentiment "
    "The Paris Water"
).split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )


def make_tiny_gpt2(vocab_size=len(WORDS)):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                     bos_token_id=2, eos_token_id=3)
    return GPT2LMHeadModel(cfg).eval()


def make_tiny_llama(vocab_size=len(WORDS)):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request):
    """Both tiny architectures, one after the other."""
    return make_tiny_gpt2() if request.param == "gpt2" else make_tiny_llama()


PANEL_PAIRS = [("the film was great", "positive"), ("the film was bad", "negative"),
               ("i loved this movie", "positive"), ("i hated this movie", "negative")]


def make_tiny_task():
    """A four-review sentiment task in the tiny tokenizer's vocabulary, for the panel tests."""
    from peft_lab import data

    return data.Task("tiny", PANEL_PAIRS * 2, PANEL_PAIRS, PANEL_PAIRS, data.VERBALIZER_SENTIMENT, data.REVIEW_TEMPLATE)


@pytest.fixture
def panel_env(tmp_path, monkeypatch):
    """What every panel test needs: its own run log, quick mode, and tiny probes and prose."""
    from peft_lab import data

    monkeypatch.setenv("PEFT_LAB_RUNLOG", str(tmp_path / "runs.jsonl"))
    monkeypatch.setenv("PEFT_LAB_QUICK", "1")
    monkeypatch.setattr(data, "load_probes", lambda: [{"prompt": "the capital of france is", "answer": "paris", "topic": "t"}] * 5)
    monkeypatch.setattr(data, "load_prose", lambda source=None: "the film was great and the food was bad . " * 10)


# A tiny sentiment task in the tiny tokenizer's words, for the training and study tests
POSITIVE = ["the film was great", "i loved this movie", "really good food", "the app is great", "very good book"]
NEGATIVE = ["the film was bad", "i hated this movie", "really terrible food", "the app is bad", "not good hotel"]


@pytest.fixture
def task():
    from peft_lab import data
    pairs = [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]
    return data.Task("tiny", pairs * 2, pairs[:4], pairs, data.VERBALIZER_SENTIMENT, data.REVIEW_TEMPLATE)


@pytest.fixture
def isolated_run_log(tmp_path, monkeypatch):
    """A run log of the test's own, so tests never see each other's runs (or a user's)."""
    monkeypatch.setenv("PEFT_LAB_RUNLOG", str(tmp_path / "runs.jsonl"))


def base_for(method: str, model):
    """The base ``method`` attaches to: QLoRA's is the model stored in 4 bits (nf4.quantize_model), every other's the
    model itself."""
    from peft_lab import nf4

    return nf4.quantize_model(model) if method == "qlora" else model


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def chat_tokenizer(tokenizer):
    """The tiny word tokenizer with ChatML's two special tokens and template (instruction tuning, chat.py)."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture
def chat_llama(chat_tokenizer, tiny_llama):
    """The tiny Llama with room in its embeddings for the chat tokenizer's two special tokens."""
    tiny_llama.resize_token_embeddings(len(chat_tokenizer))
    return tiny_llama
