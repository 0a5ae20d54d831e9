"""Model loading: a hub id or a local folder, through the real `from_pretrained` path.

`load()` is the only way the app gets a model. `--model tiny-random` does not bypass it:
`build_tiny_random()` writes a small random-weight Qwen3-VL checkpoint (config, weights, a
byte-level tokenizer carrying the Qwen special tokens, a Qwen-style chat template and the
image processor config) into the data folder once, and then that folder is loaded exactly
like a downloaded model. Tests and offline smoke runs therefore exercise the same code as
production; only the numbers in the weights differ.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from chat.engine.sampling_defaults import CARD, SamplingDefaults, read_generation_config

log = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A Qwen-style ChatML template written for the tiny checkpoint. The real model ships its own;
# both render an image part as <|vision_start|><|image_pad|><|vision_end|>.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>{{ 'assistant\\n' }}{%- endif -%}"
)


class ModelLoadError(RuntimeError):
    """Loading failed; the message is one paragraph that says what to do."""


@dataclass
class Loaded:
    """What the engine needs from a loaded checkpoint."""

    model: torch.nn.Module
    processor: object
    name: str
    device: torch.device
    dtype: torch.dtype
    random_weights: bool
    # issue 14: what a request gets for a sampling value it leaves out (the checkpoint's generation config,
    # else the model card's; chat/engine/sampling_defaults.py)
    sampling_defaults: SamplingDefaults = CARD


def pick_device(requested: str = "auto") -> tuple[torch.device, torch.dtype]:
    """bf16 on the GPU when there is one, float32 on the CPU; a GPU asked for and missing is an error."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), torch.float32
    device = torch.device("cuda" if requested == "auto" else requested)
    try:
        usable = torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
        if usable:
            torch.empty(1, device=device)  # a driver too old for this torch fails here, not mid-load
    except Exception as exc:  # noqa: BLE001 - any CUDA init failure means "no usable GPU"
        usable = False
        reason = f" ({exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0]})"
    else:
        reason = ""
    if not usable:
        raise ModelLoadError(
            f"--device {requested} (VLCHAT_DEVICE) asks for a GPU, but none is usable here{reason}. Check that "
            "`nvidia-smi` works, that the NVIDIA driver supports this torch build's CUDA "
            f"({torch.version.cuda or 'none'}), and in Docker that the container was started with `--gpus all`; "
            "or pass --device cpu (slow) or --device auto."
        )
    return device, torch.bfloat16


def tiny_random_config():
    """The small Qwen3-VL config used for the tiny checkpoint (and its tests)."""
    from transformers import Qwen3VLConfig

    vocab = 256 + len(SPECIAL_TOKENS)
    ids = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=32768,
            rope_parameters=dict(
                rope_type="default", rope_theta=5_000_000.0, mrope_section=[2, 3, 3], mrope_interleaved=True
            ),
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            num_position_embeddings=256,
            deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def _tiny_tokenizer():
    """A byte-level BPE with no merges: every byte is a token, plus the Qwen specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )


def build_tiny_random(folder: Path, seed: int = 0) -> Path:
    """Write the tiny random-weight checkpoint to `folder` once; later calls reuse it."""
    from transformers import (
        GenerationConfig,
        Qwen2VLImageProcessor,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    folder = Path(folder)
    if (folder / "config.json").exists() and (folder / "vlchat-tiny.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    log.info("building the tiny random-weight Qwen3-VL checkpoint in %s", folder)
    torch.manual_seed(seed)
    config = tiny_random_config()
    model = Qwen3VLForConditionalGeneration(config)
    tokenizer = _tiny_tokenizer()
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with torch.no_grad():
        # Shape the noise so the page stays readable and answers run long enough to stop: only
        # printable ASCII (and newline) keep output rows, scaled up so sampling is peaked; every
        # other row, the end tokens included, gives a logit of exactly 0 and is almost never drawn.
        keep = sorted({tokenizer.convert_tokens_to_ids(tokenizer.tokenize(chr(b))[0]) for b in [10, *range(32, 127)]})
        weight = torch.zeros_like(model.lm_head.weight)
        weight[keep] = model.lm_head.weight[keep] * 20.0
        model.lm_head.weight.copy_(weight)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos[1])
    model.save_pretrained(folder)
    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 1024},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    # Written last: its presence marks a complete build (a crash mid-build rebuilds).
    (folder / "vlchat-tiny.json").write_text(json.dumps({"seed": seed, "random_weights": True}))
    return folder


def _check_hub(repo_id: str) -> None:
    """Fail in seconds, not after minutes of retries, when a hub model is neither cached nor reachable."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    reason = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true") else ""
    if not reason:
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
            return
        except OSError as exc:
            reason = f"{endpoint.hostname} cannot be reached ({exc.__class__.__name__})"
    raise ModelLoadError(
        f"Model '{repo_id}' is not in the local cache and {reason}. Download it on a machine with network "
        f"access (`hf download {repo_id} --local-dir ./model`), copy the folder here and pass "
        "--model ./model, or use --model tiny-random for an offline smoke run."
    )


def _weights_bytes(source: str) -> int:
    """Total size of the checkpoint's weight files (0 when unknown), for load progress."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001 - progress is a nicety; never fail a load over it
            return 0
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


class _Progress:
    """Reports loading progress as GPU memory filled against the weights' size, every half second."""

    def __init__(self, report, device: torch.device, total: int) -> None:
        self.report, self.device, self.total = report, device, total
        self.base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vlchat-load-progress", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            done = torch.cuda.memory_allocated(self.device) - self.base
            self.report("loading", min(0.99, max(0.0, done / self.total)))

    def __enter__(self) -> _Progress:
        self.report("loading", 0.0 if self.total else None)
        if self.total and self.device.type == "cuda":
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()


def quantization(kind: str, dtype: torch.dtype):
    """bitsandbytes settings for --quantize: the language model's projections in int8 or 4-bit NF4.

    The vision encoder and lm_head stay in the model's type: they are a small share of the memory and
    carry the precision that reading text in screenshots needs.
    """
    if not kind:
        return None
    from transformers import BitsAndBytesConfig

    skip = ["model.visual", "lm_head"]
    if kind == "int8":
        # It says on every call that it casts bf16 inputs to fp16; once is enough.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=skip)


def placement(dev: torch.device, max_gpu_memory: str = "", max_memory: dict | None = None) -> dict:
    """from_pretrained's device arguments: all on `dev`, or (--max-gpu-memory) as much as fits, the rest offloaded.

    `max_memory` (tests): accelerate's budget per device as given, e.g. {"cpu": "1MB"} offloads to disk on a CPU.
    """
    if max_gpu_memory:
        if dev.type != "cuda":
            raise ModelLoadError("--max-gpu-memory (VLCHAT_MAX_GPU_MEMORY) limits what the weights take on the GPU, "
                                 "but the model runs on the CPU here; leave it empty or use --device cuda.")
        max_memory = {dev.index or 0: max_gpu_memory.replace(" ", ""), "cpu": "1024GiB"}
    if max_memory:
        return {"device_map": "auto", "max_memory": max_memory}
    return {"device_map": {"": str(dev)} if dev.type == "cuda" else None}


def load(model: str, data_dir: Path, device: str = "auto", progress=None, quantize: str = "",
         max_gpu_memory: str = "", max_memory: dict | None = None) -> Loaded:
    """Load processor and model from a hub id, a local folder or `tiny-random`.

    `progress(phase, fraction)`, when given, hears how far loading the weights has got. `quantize`
    ('int8', 'nf4') loads the language model's weights quantized by bitsandbytes; `max_gpu_memory`
    keeps the weights within that much GPU memory and offloads the rest (see `placement`).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    random_weights = model == TINY_RANDOM
    source = str(build_tiny_random(Path(data_dir) / "models" / TINY_RANDOM) if random_weights else model)
    dev, dtype = pick_device(device)
    if random_weights:
        dtype = torch.float32  # tiny: exactness over speed, and the same numbers on CPU and GPU
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists()
    if looks_local and not Path(source).expanduser().is_dir():
        raise ModelLoadError(
            f"Model folder '{source}' does not exist. Pass --model with a folder that holds config.json "
            "and the weights (for example one made with `hf download`), a hub id such as "
            "Qwen/Qwen3-VL-8B-Instruct on a machine that can reach the hub, or --model tiny-random for an "
            "offline smoke run."
        )
    if not looks_local:
        _check_hub(source)
    started = time.monotonic()
    log.info("loading processor from %s", source)
    try:
        processor = AutoProcessor.from_pretrained(source)
        log.info("loading model weights from %s on %s as %s (this can take a minute)", source, dev, dtype)
        with _Progress(progress or (lambda phase, fraction: None), dev, _weights_bytes(source)):
            extra = placement(dev, max_gpu_memory, max_memory)
            if extra["device_map"] == "auto":
                extra["offload_folder"] = str(Path(data_dir) / "offload")
            if quantize:
                extra["quantization_config"] = quantization(quantize, dtype)
                extra["device_map"] = extra["device_map"] or {"": str(dev)}
            net = AutoModelForImageTextToText.from_pretrained(
                source,
                dtype=dtype,
                attn_implementation="sdpa",
                **extra,
            )
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"The GPU ran out of memory while loading '{source}' ({exc.__class__.__name__}). Qwen3-VL-8B needs "
            "about 18 GB for weights plus room for images and the KV cache: free the GPU (other processes), "
            "use a larger card, or try a smaller Qwen3-VL checkpoint with --model."
        ) from exc
    except ImportError as exc:  # --quantize without bitsandbytes
        raise ModelLoadError(f"--quantize {quantize} needs the bitsandbytes package ({exc}); "
                             "install it with: pip install bitsandbytes") from exc
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelLoadError(
            f"Could not load model '{source}': {first} If this is a hub id, this machine may have no network "
            "access or no token for it: download the model elsewhere (`hf download "
            "Qwen/Qwen3-VL-8B-Instruct --local-dir ./qwen3-vl-8b`), copy the folder here and pass "
            "--model ./qwen3-vl-8b. Use --model tiny-random for an offline smoke run."
        ) from exc
    net.eval()
    log.info("model ready in %.1f s: %s", time.monotonic() - started, source)
    name = TINY_RANDOM if random_weights else (Path(source).expanduser().name if looks_local else model)
    return Loaded(model=net, processor=processor, name=name, device=dev, dtype=dtype, random_weights=random_weights,
                  sampling_defaults=read_generation_config(source))
