#!/usr/bin/env python
"""Train tessera's small demo model from text every machine has offline.

tessera must run out of the box on a machine with no model hub, so the
repository ships a tiny Llama-architecture model in Hugging Face format
(``models/tessera-demo``).  This script rebuilds it from scratch:

1. Corpus: the ``.py`` files of the running interpreter's standard library
   (``sysconfig.get_paths()["stdlib"]``), without tests, ``idlelib``,
   ``site-packages``, machine-specific build files and anything that is not
   UTF-8.  Files are sorted by path, shuffled with a fixed seed and split by
   file into train (98%) and validation (2%).  Different Python versions ship
   different sources; the model card records the version and the corpus
   fingerprint (see ``demo_model/CORPUS.md``).
2. Tokenizer: byte-level BPE trained with ``tokenizers`` on the train split
   (vocab 8192) with the special tokens ``<|endoftext|>`` (EOS, also put
   between files), ``<|im_start|>`` / ``<|im_end|>`` (ChatML turns) and
   ``<|pad|>``, plus a ``tokenizer_config.json`` carrying a ChatML
   ``chat_template``.
3. Model: ``LlamaForCausalLM`` (tied embeddings, grouped-query attention)
   trained for a fixed number of AdamW steps (warmup + cosine decay) on packed
   sequences, with fixed seeds for weights and data order.
4. Report: train/validation loss and a greedy completion of
   ``def fibonacci(n):``, written into the model card.

Training runs on the CPU with ONE torch thread (the full run takes about half
an hour on a recent x86 core), so it is reproducible on the same Python,
torch and CPU kind::

    python demo_model/train.py                 # full build into models/tessera-demo
    python demo_model/train.py --quick         # smoke run of a few steps into a temp dir

Requires ``torch``, ``tokenizers`` and ``transformers`` (``pip install -e .[test]``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

# One thread everywhere: deterministic, and polite on shared machines.  These
# must be set before torch / tokenizers start their thread pools.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "models" / "tessera-demo"

SEED = 1234
VAL_FRACTION = 0.02

EOS, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, PAD]  # ids 0, 1, 2, 3
VOCAB_SIZE = 8192

# ChatML, in Hugging Face chat-template semantics (jinja2 with `raise_exception`).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unknown role: ' ~ message['role'] ~ ' (expected system, user or assistant)') }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Model shape: 6.23M parameters, 24.9 MB of float32 safetensors.
MODEL_SHAPE = dict(
    hidden_size=256,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=640,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    initializer_range=0.02,
    tie_word_embeddings=True,
)

# Training recipe (full run).  Fixed step count, so the result does not depend
# on how fast the machine is.
FULL = dict(steps=1500, batch_size=4, seq_len=512, lr=2e-3, min_lr_ratio=0.1, warmup=100,
            weight_decay=0.1, grad_clip=1.0, log_every=25, eval_batches=None)
QUICK = dict(steps=6, batch_size=2, seq_len=128, lr=2e-3, min_lr_ratio=0.1, warmup=2,
             weight_decay=0.1, grad_clip=1.0, log_every=1, eval_batches=4)

PROMPT = "def fibonacci(n):"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- corpus

EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}


def is_excluded(rel: Path) -> bool:
    if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
        return True
    # Build-machine specific files (paths, compiler flags): not reproducible.
    if rel.parts[0].startswith("config-") or rel.name.startswith("_sysconfigdata"):
        return True
    return False


def load_corpus(stdlib: Path, quick: bool) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict]:
    """Return (train, val, info); each split a list of (relative path, source)."""
    files: list[tuple[str, str]] = []
    skipped_non_utf8 = 0
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if is_excluded(rel) or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped_non_utf8 += 1
            continue
        files.append((rel.as_posix(), text))
    files.sort()
    random.Random(SEED).shuffle(files)
    n_val = max(1, round(len(files) * VAL_FRACTION))
    val, train = files[:n_val], files[n_val:]
    if quick:
        train, val = train[:40], val[:4]

    digest = hashlib.sha256()
    for rel, text in sorted(files):
        digest.update(rel.encode() + b"\0" + text.encode("utf-8") + b"\0")
    info = dict(
        python=platform.python_version(),
        stdlib=str(stdlib),
        files=len(files),
        bytes=sum(len(t.encode("utf-8")) for _, t in files),
        skipped_non_utf8=skipped_non_utf8,
        train_files=len(train),
        train_bytes=sum(len(t.encode("utf-8")) for _, t in train),
        val_files=len(val),
        val_bytes=sum(len(t.encode("utf-8")) for _, t in val),
        sha256=digest.hexdigest(),
        val_paths=sorted(rel for rel, _ in val),
    )
    return train, val, info


# ------------------------------------------------------------------------ tokenizer

def train_tokenizer(train: list[tuple[str, str]], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((text for _, text in train), trainer=trainer, length=len(train))
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def write_tokenizer(tok: Tokenizer, out: Path, model_max_length: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": EOS, "pad_token": PAD, "additional_special_tokens": [IM_START, IM_END]}, indent=2) + "\n")


def check_tokenizer(out: Path, tok: Tokenizer) -> None:
    """Byte-level round trip, and that transformers loads it offline with the chat template."""
    samples = [
        "def héllo(wörld):\n    return f'{wörld!r} → ✓ 日本語 🐍'\n\n\tx = 1  # tabs\r\n",
        "class A:\n    \"\"\"Docstring with ümlauts and emoji 🎉.\"\"\"\n        \n",
        "  leading spaces, trailing spaces   ",
    ]
    for s in samples:
        ids = tok.encode(s).ids
        assert tok.decode(ids, skip_special_tokens=False) == s, ("tokenizers round trip", s)

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    for s in samples:
        ids = hf(s, add_special_tokens=True)["input_ids"]
        assert ids == tok.encode(s).ids, "transformers adds tokens the raw tokenizer does not"
        assert hf.decode(ids) == s, ("transformers round trip", s)
    assert hf.eos_token == EOS and hf.eos_token_id == 0, (hf.eos_token, hf.eos_token_id)
    assert hf.pad_token == PAD and hf.pad_token_id == 3
    assert hf.bos_token is None
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}]
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert rendered == expected, rendered
    ids = hf.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=False, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert ids[0] == 1 and 2 in ids, ids  # <|im_start|> ... <|im_end|> are single tokens
    try:
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    except Exception as e:  # jinja2 TemplateError raised through raise_exception
        assert "Unknown role" in str(e), e
    else:
        raise AssertionError("chat template accepted an unknown role")
    log("tokenizer checks passed (round trip, AutoTokenizer offline, chat template)")


# ---------------------------------------------------------------------------- data

def encode_split(tok: Tokenizer, split: list[tuple[str, str]]) -> torch.Tensor:
    """One token stream: file, EOS, file, EOS, ..."""
    eos = tok.token_to_id(EOS)
    stream: list[int] = []
    for enc in tok.encode_batch([text for _, text in split]):
        stream.extend(enc.ids)
        stream.append(eos)
    return torch.tensor(stream, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Packed, non-overlapping sequences of seq_len tokens (the tail is dropped)."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def batches(data: torch.Tensor, batch_size: int, seed: int):
    """Endless stream of batches; every epoch is a seeded permutation of the sequences."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(data.size(0), generator=g)
        for i in range(0, order.numel() - batch_size + 1, batch_size):
            yield data[order[i : i + batch_size]]


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batch_size: int = 8, max_batches: int | None = None) -> float:
    """Mean next-token loss over the sequences in data (the first max_batches batches, if given)."""
    model.eval()
    total, n = 0.0, 0
    for b, i in enumerate(range(0, data.size(0), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        x = data[i : i + batch_size]
        total += model(input_ids=x, labels=x).loss.item() * x.size(0)
        n += x.size(0)
    model.train()
    return total / max(1, n)


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"output directory (default {DEFAULT_OUT.relative_to(REPO_ROOT)}; a temp dir with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small corpus slice, a few steps")
    ap.add_argument("--steps", type=int, default=None, help="override the number of optimizer steps")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    random.seed(SEED)
    hp = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        hp["steps"] = args.steps
    out = args.out or (Path(tempfile.mkdtemp(prefix="tessera-demo-")) if args.quick else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    log(f"python {platform.python_version()}, torch {torch.__version__}, out={out}, hp={hp}")

    # 1. corpus
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_files, val_files, corpus = load_corpus(stdlib, args.quick)
    log(f"corpus: {corpus['files']} files, {corpus['bytes']:,} bytes (train {corpus['train_files']}, "
        f"val {corpus['val_files']}, skipped non-UTF-8 {corpus['skipped_non_utf8']}), sha256 {corpus['sha256'][:16]}")

    # 2. tokenizer
    tok = train_tokenizer(train_files, VOCAB_SIZE)
    write_tokenizer(tok, out, MODEL_SHAPE["max_position_embeddings"])
    check_tokenizer(out, tok)
    train_stream, val_stream = encode_split(tok, train_files), encode_split(tok, val_files)
    corpus.update(vocab_size=tok.get_vocab_size(), train_tokens=train_stream.numel(), val_tokens=val_stream.numel())
    log(f"tokens: train {train_stream.numel():,}, val {val_stream.numel():,} "
        f"({corpus['train_bytes'] / train_stream.numel():.2f} bytes/token), vocab {tok.get_vocab_size()}")

    # 3. model
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=tok.get_vocab_size(), bos_token_id=None, eos_token_id=0, pad_token_id=3,
                         **MODEL_SHAPE)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters ({n_params * 4 / 1e6:.1f} MB float32)")

    train_data = windows(train_stream, hp["seq_len"])
    val_data = windows(val_stream, hp["seq_len"])
    # A fixed sample of train sequences, the size of the validation set, for a comparable train loss.
    g = torch.Generator().manual_seed(SEED + 1)
    train_eval = train_data[torch.randperm(train_data.size(0), generator=g)[: val_data.size(0)]]
    tokens_per_step = hp["batch_size"] * hp["seq_len"]
    log(f"data: {train_data.size(0)} train / {val_data.size(0)} val sequences of {hp['seq_len']}; "
        f"{hp['steps']} steps x {tokens_per_step} tokens = {hp['steps'] * tokens_per_step / train_stream.numel():.2f} epochs")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=hp["lr"], betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step: int) -> float:  # step counts from 0
        if step < hp["warmup"]:
            return hp["lr"] * (step + 1) / hp["warmup"]
        progress = (step - hp["warmup"]) / max(1, hp["steps"] - hp["warmup"])
        return hp["lr"] * (hp["min_lr_ratio"] + (1 - hp["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))

    history = []
    recent: list[float] = []
    model.train()
    data_iter = batches(train_data, hp["batch_size"], SEED)
    t_train = time.time()
    mid_val = None
    for step in range(hp["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x = next(data_iter)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(loss.item())
        if (step + 1) % hp["log_every"] == 0 or step + 1 == hp["steps"]:
            elapsed = time.time() - t_train
            avg = sum(recent) / len(recent)
            history.append((step + 1, avg))
            log(f"step {step + 1}/{hp['steps']} loss {avg:.4f} lr {lr_at(step):.2e} "
                f"{(step + 1) * tokens_per_step / elapsed:.0f} tok/s elapsed {elapsed / 60:.1f} min")
            recent = []
        if step + 1 == hp["steps"] // 2 and not args.quick:
            mid_val = evaluate(model, val_data, max_batches=hp["eval_batches"])
            log(f"step {step + 1}: validation loss {mid_val:.4f}")
    train_minutes = (time.time() - t_train) / 60

    final_train_loss = evaluate(model, train_eval, max_batches=hp["eval_batches"])
    final_val_loss = evaluate(model, val_data, max_batches=hp["eval_batches"])
    last_logged = history[-1][1]
    log(f"final: train loss {final_train_loss:.4f} (last logged batch avg {last_logged:.4f}), "
        f"validation loss {final_val_loss:.4f} (ppl {math.exp(final_val_loss):.1f})")

    # 4. save + greedy completion
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=0, pad_token_id=3,
        do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=128,
    )
    model.save_pretrained(str(out), safe_serialization=True)
    for f in out.iterdir():  # save_pretrained may create files 0600; make them plain repository files
        f.chmod(0o644)
    completion = greedy_completion(out, PROMPT, 64)
    log(f"greedy completion of {PROMPT!r}:\n{completion}")

    safetensors_mb = (out / "model.safetensors").stat().st_size / 1e6
    total_minutes = (time.time() - t_start) / 60
    write_model_card(out, dict(
        corpus=corpus, hp=hp, shape=MODEL_SHAPE, n_params=n_params, vocab_size=tok.get_vocab_size(),
        final_train_loss=final_train_loss, last_logged=last_logged, final_val_loss=final_val_loss, mid_val=mid_val,
        history=history, n_eval_seqs=val_data.size(0) if hp["eval_batches"] is None else min(val_data.size(0), 8 * hp["eval_batches"]),
        completion=completion, safetensors_mb=safetensors_mb, train_minutes=train_minutes,
        total_minutes=total_minutes, quick=args.quick,
    ))
    log(f"wrote {out} (model.safetensors {safetensors_mb:.1f} MB) in {total_minutes:.1f} min")


def greedy_completion(out: Path, prompt: str, max_new_tokens: int) -> str:
    """Reload what was saved (as a user would) and complete the prompt greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, temperature=None, top_p=None)
    return tok.decode(gen[0], skip_special_tokens=False)


def write_model_card(out: Path, r: dict) -> None:
    c, hp, s = r["corpus"], r["hp"], r["shape"]
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    curve = "\n".join(f"| {step} | {loss:.3f} |" for step, loss in r["history"][:: max(1, len(r["history"]) // 16)])
    mid = f"{r['mid_val']:.3f}" if r["mid_val"] is not None else "n/a"
    card = f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [llama, tessera, demo, tiny]
---

# tessera-demo

A tiny Llama-architecture language model shipped inside the tessera repository so that
tessera runs out of the box on a machine with no model hub.  It was trained on the Python
standard library's source code only: it writes Python-looking text, nothing more.  It is a
demo and test fixture, **not** a useful assistant (it never saw a chat transcript, although
its tokenizer has ChatML tokens and a chat template).
{"" if not r["quick"] else chr(10) + "**This is a `--quick` smoke build: a few steps, not a usable model.**" + chr(10)}
## Model

| | |
|---|---|
| architecture | `LlamaForCausalLM`, tied input/output embeddings |
| parameters | {r["n_params"]:,} |
| hidden size / layers | {s["hidden_size"]} / {s["num_hidden_layers"]} |
| attention heads / KV heads (GQA) / head dim | {s["num_attention_heads"]} / {s["num_key_value_heads"]} / {head_dim} |
| MLP intermediate size | {s["intermediate_size"]} (SwiGLU) |
| max position embeddings | {s["max_position_embeddings"]} (RoPE theta {s["rope_theta"]:g}; trained on {hp["seq_len"]}-token sequences) |
| vocabulary | {r["vocab_size"]} (byte-level BPE) |
| weights | `model.safetensors`, float32, {r["safetensors_mb"]:.1f} MB |

Special tokens: `<|endoftext|>` (id 0, EOS and file separator), `<|im_start|>` (1),
`<|im_end|>` (2), `<|pad|>` (3); no BOS token.  `tokenizer_config.json` carries a ChatML
`chat_template` (`<|im_start|>role\\ncontent<|im_end|>\\n`, roles system/user/assistant,
`add_generation_prompt` appends `<|im_start|>assistant\\n`).

## Training data

The `.py` files of the Python {c["python"]} standard library (`sysconfig.get_paths()["stdlib"]`),
excluding `test/`, `tests/`, `idlelib/`, `site-packages/`, machine-specific build files
(`_sysconfigdata_*.py`, `config-*/`) and files that are not valid UTF-8
({c["skipped_non_utf8"]} skipped).  Sorted by path, shuffled with seed {SEED}, split by file:

| split | files | bytes | tokens |
|---|---|---|---|
| train | {c["train_files"]} | {c["train_bytes"]:,} | {c["train_tokens"]:,} |
| validation | {c["val_files"]} | {c["val_bytes"]:,} | {c["val_tokens"]:,} |

Corpus fingerprint (sha256 over sorted path + content): `{c["sha256"]}`.
Another Python version ships different sources and gives a different corpus and model;
see `demo_model/CORPUS.md`.

## Training

AdamW (betas 0.9/0.95, weight decay {hp["weight_decay"]} on matrices), peak learning rate
{hp["lr"]:g}, {hp["warmup"]} warmup steps then cosine decay to {hp["min_lr_ratio"]:g}x, gradient clipping
{hp["grad_clip"]}, {hp["steps"]} steps of {hp["batch_size"]} packed sequences x {hp["seq_len"]} tokens
({hp["steps"] * hp["batch_size"] * hp["seq_len"]:,} tokens, {hp["steps"] * hp["batch_size"] * hp["seq_len"] / c["train_tokens"]:.2f} epochs),
float32, CPU, one torch thread, seed {SEED}.  Training took {r["train_minutes"]:.1f} min
({r["total_minutes"]:.1f} min end to end) with Python {c["python"]}, torch {torch.__version__}.

| | loss (nats/token) |
|---|---|
| train (fixed sample of {r["n_eval_seqs"]} train sequences, end) | {r["final_train_loss"]:.3f} |
| train (mean of the last {hp["log_every"]} batches) | {r["last_logged"]:.3f} |
| validation (midway) | {mid} |
| validation (all {r["n_eval_seqs"]} sequences, end) | {r["final_val_loss"]:.3f} (perplexity {math.exp(r["final_val_loss"]):.1f}) |

<details><summary>Training loss curve</summary>

| step | train loss |
|---|---|
{curve}

</details>

## Sample

Greedy completion of `{PROMPT}` (64 new tokens, `do_sample=False`):

```python
{r["completion"]}
```

## Rebuild

```
python demo_model/train.py --out models/tessera-demo
```

(`make demo-model`).  Deterministic for a given Python, torch and CPU kind; float
rounding in other BLAS kernels may give slightly different weights.
"""
    (out / "README.md").write_text(card)


if __name__ == "__main__":
    sys.exit(main())
