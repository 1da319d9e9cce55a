"""The benchmark model (Llama shape, random weights) and workload, shared by the benchmarks."""
from __future__ import annotations

import platform
import random
from dataclasses import dataclass
from pathlib import Path

BENCH_SHAPE = dict(
    hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
    intermediate_size=1408, vocab_size=32000, max_position_embeddings=2048,
)


def cpu_model() -> str:
    """The CPU's name and the vector ISA that matters here, e.g. 'Intel Xeon (AVX512; avx512_bf16 amx_bf16)'."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    extras = sorted(flags & {"avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"})
    import torch

    return f"{name} ({torch.backends.cpu.get_cpu_capability()}{'; ' + ' '.join(extras) if extras else ''})"


def build_bench_model(directory: str | Path) -> Path:
    """Writes the random-weight fp32 benchmark checkpoint once; later calls reuse it."""
    directory = Path(directory)
    if (directory / "model.safetensors").exists():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**BENCH_SHAPE, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def build_bench_tokenizer(directory: str | Path) -> Path:
    """A byte-level BPE tokenizer.json with the bench model's 32000 tokens (ids 0-2 are <unk>, <s>, </s>, so EOS is
    the model's eos_token_id 2), trained once on the Python standard library's sources, like the demo model's.
    Only what reads text needs it (structured outputs: the grammar is compiled against the vocabulary)."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if path.exists():
        return path
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:4000]:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            pass  # a few test files are deliberately not UTF-8
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=BENCH_SHAPE["vocab_size"], show_progress=False,
                                                             special_tokens=["<unk>", "<s>", "</s>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(path))
    return path


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]


def make_workload(num_requests=64, prompt_range=(32, 512), output_range=(16, 256), seed=0, vocab=32000) -> Workload:
    rng = random.Random(seed)
    prompts, output_lens = [], []
    for _ in range(num_requests):
        prompts.append([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_range))])
        output_lens.append(rng.randint(*output_range))
    return Workload(prompts, output_lens)


def time_layers(layers, inputs, steps: int) -> float:
    """Mean seconds of one pass of `layers` over their `inputs` (one decode step's linear layers, say)."""
    import time

    def step():
        for layer, x in zip(layers, inputs):
            layer(x)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps
