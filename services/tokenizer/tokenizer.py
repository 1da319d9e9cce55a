"""A Hugging Face tokenizer directory, loaded with the `tokenizers` library alone.

The directory holds `tokenizer.json` (the whole pipeline: normalizer, pre-tokenizer, model, post-processor,
decoder, added tokens) and usually `tokenizer_config.json` (named special tokens, chat template, limits). We
read both the way `transformers.AutoTokenizer` (v5) does, so ids and text match it, and we never import or run
code from the checkpoint (`auto_map` and `tokenizer_class` are ignored).

One deliberate difference: when tokenizer.json has no post-processor, `add_bos_token` / `add_eos_token` from
tokenizer_config.json are honoured (transformers 5 ignores them whenever tokenizer.json exists; transformers 4's
Llama tokenizer honoured them). A checkpoint whose post-processor already adds BOS is read as transformers 5
reads it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers writes "infinite" model_max_length as int(1e30); such values mean "no limit".
NO_LIMIT = int(1e29)
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
# The old text fix-ups of `clean_up_tokenization_spaces` (transformers applies them to non-BPE models only).
CLEAN_UP_REPLACEMENTS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TokenizerError(ValueError):
    """The tokenizer directory is missing a file or holds one we cannot read; the message names the file."""


class Tokenizer:
    """Text <-> token ids for one model directory.

    Attributes: `special_tokens_map` ({"bos_token": "<s>", ...}, the strings chat templates see), `bos_token`,
    `eos_token`, `bos_token_id`, `eos_token_id`, `eos_token_ids` (with generation_config.json's), `pad_token_id`,
    `unk_token_id`, `all_special_ids`, `vocab_size`, `model_max_length` (None = no limit), `chat_templates`
    (name -> template) and `chat_template` (the default one or None).
    """

    def __init__(self, model_dir: str | Path):
        self.path = Path(model_dir)
        self.backend = _load_backend(self.path / "tokenizer.json")
        # A tokenizer.json may carry truncation or padding settings; transformers turns them off unless asked,
        # and a prompt must never be cut short silently.
        self.backend.no_truncation()
        self.backend.no_padding()
        config = _read_json(self.path / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:
            # Legacy checkpoints keep the special tokens in special_tokens_map.json, which wins over the config.
            config.update(_read_json(self.path / "special_tokens_map.json"))

        named, extra = _special_tokens(config)
        self._add_missing_tokens(config, named, extra)
        self.special_tokens_map: dict[str, str] = {key: tok.content for key, tok in named.items()}
        self.bos_token = self.special_tokens_map.get("bos_token")
        self.eos_token = self.special_tokens_map.get("eos_token")
        self.bos_token_id = self._id_or_none(self.bos_token)
        self.eos_token_id = self._id_or_none(self.eos_token)
        self.pad_token_id = self._id_or_none(self.special_tokens_map.get("pad_token"))
        self.unk_token_id = self._id_or_none(self.special_tokens_map.get("unk_token"))
        special_strings = dict.fromkeys([tok.content for tok in named.values()] + [tok.content for tok in extra])
        self.all_special_ids: list[int] = [i for i in map(self._id_or_none, special_strings) if i is not None]
        self.eos_token_ids: tuple[int, ...] = self._eos_ids(_read_json(self.path / "generation_config.json"))

        if self.backend.post_processor is None:
            self._add_bos_eos_from_config(bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))
        self.clean_up_tokenization_spaces = (bool(config.get("clean_up_tokenization_spaces", False))
                                             and type(self.backend.model).__name__ != "BPE")
        limit = config.get("model_max_length")
        self.model_max_length: int | None = int(limit) if isinstance(limit, (int, float)) and limit < NO_LIMIT else None
        self.vocab_size = max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        # Ids the decoder drops with skip_special_tokens=True, and SentencePiece byte-fallback tokens (<0xE6>),
        # whose runs decode as a group: both matter to the incremental detokenizer.
        self.skipped_special_ids = frozenset(i for i, tok in self.backend.get_added_tokens_decoder().items()
                                             if tok.special)
        self.byte_fallback_ids = frozenset(i for i in map(self.backend.token_to_id, BYTE_TOKENS) if i is not None)
        self.chat_templates = _chat_templates(self.path, config.get("chat_template"))

    # -- text <-> ids ---------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str,
                            add_special_tokens: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, for each, the (start, end) character span of `text` it came from ((0, 0) for added BOS/EOS)."""
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return encoding.ids, [tuple(span) for span in encoding.offsets]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self.decode_raw(ids, skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for old, new in CLEAN_UP_REPLACEMENTS:
                text = text.replace(old, new)
        return text

    def decode_raw(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The decoder's text without `clean_up_tokenization_spaces` (which no BPE model uses): what streams."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # -- chat -----------------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            template_name: str | None = None, **extra: Any) -> str:
        """Render `messages` with the checkpoint's template. Tokenize the result with add_special_tokens=False:
        the template already writes BOS where the model wants it."""
        from .chat_template import ChatTemplateError, render_chat

        tools = extra.get("tools") is not None
        name = template_name or ("tool_use" if tools and "tool_use" in self.chat_templates else "default")
        template = self.chat_templates.get(name)
        if template is None:
            known = ", ".join(sorted(self.chat_templates)) or "none"
            raise ChatTemplateError(f"the tokenizer has no chat template {name!r} (it has: {known})")
        return render_chat(template, messages, add_generation_prompt, self.special_tokens_map, **extra)

    # -- loading helpers ------------------------------------------------------------------------------------

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def _add_missing_tokens(self, config: dict, named: dict[str, AddedToken], extra: list[AddedToken]) -> None:
        # As transformers does: tokens listed in the config but absent from tokenizer.json are appended to the
        # vocabulary, and named special tokens become special added tokens (a base-vocab token keeps its id).
        present = self.backend.get_added_tokens_decoder().values()
        present_reprs = {repr(tok) for tok in present}
        to_add = [tok for _, tok in sorted(_added_tokens_decoder(config).items()) if repr(tok) not in present_reprs]
        contents = {tok.content for tok in present} | {tok.content for tok in to_add}
        for tok in [*named.values(), *extra]:
            if tok.content not in contents:
                to_add.append(tok)
                contents.add(tok.content)
        if to_add:
            self.backend.add_tokens(to_add)

    def _add_bos_eos_from_config(self, add_bos: bool, add_eos: bool) -> None:
        add_bos = add_bos and self.bos_token_id is not None
        add_eos = add_eos and self.eos_token_id is not None
        if not (add_bos or add_eos):
            return

        def sequence(name: str, type_id: int) -> str:
            bos = f"{self.bos_token}:{type_id} " if add_bos else ""
            eos = f" {self.eos_token}:{type_id}" if add_eos else ""
            return f"{bos}${name}:{type_id}{eos}"

        specials = [(self.bos_token, self.bos_token_id)] if add_bos else []
        specials += [(self.eos_token, self.eos_token_id)] if add_eos and self.eos_token != self.bos_token else []
        self.backend.post_processor = processors.TemplateProcessing(
            single=sequence("A", 0), pair=f"{sequence('A', 0)} {sequence('B', 1)}", special_tokens=specials)

    def _eos_ids(self, generation_config: dict) -> tuple[int, ...]:
        # Chat models often end a turn with a token other than the tokenizer's EOS (Llama 3: <|eot_id|>);
        # generation_config.json lists them all.
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        extra = generation_config.get("eos_token_id")
        ids += [extra] if isinstance(extra, int) else [i for i in extra or [] if isinstance(i, int)]
        return tuple(dict.fromkeys(ids))


def _load_backend(path: Path) -> BackendTokenizer:
    if not path.is_file():
        raise TokenizerError(f"{path}: not found (a Hugging Face tokenizer.json is required)")
    try:
        return BackendTokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for bad JSON and unknown components
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({error})") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _added_token(value: Any, special: bool | None = None) -> AddedToken:
    """A token from the config: a plain string (a special token then) or an AddedToken dict."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        fields = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
        if special is not None:
            fields["special"] = special
        return AddedToken(value["content"], **fields)
    raise TokenizerError("tokenizer_config.json / special_tokens_map.json: a token must be a string or an "
                         f"AddedToken object, got {value!r}")


def _added_tokens_decoder(config: dict) -> dict[int, AddedToken]:
    entries = config.get("added_tokens_decoder") or {}
    try:
        return {int(i): _added_token(entry, special=None) for i, entry in entries.items()}
    except (AttributeError, ValueError) as error:
        raise TokenizerError(f"tokenizer_config.json: bad added_tokens_decoder ({error})") from None


def _special_tokens(config: dict) -> tuple[dict[str, AddedToken], list[AddedToken]]:
    """Named special tokens (bos_token, ..., and model-specific ones like image_token) and the extra list."""
    by_content = {tok.content: tok for tok in _added_tokens_decoder(config).values()}

    def special(value: Any) -> AddedToken:
        # A string names a token whose properties the added_tokens_decoder may hold; either way it is special.
        tok = by_content.get(value) if isinstance(value, str) else None
        if tok is None:
            return _added_token(value, special=True)
        return tok if tok.special else AddedToken(tok.content, single_word=tok.single_word, lstrip=tok.lstrip,
                                                  rstrip=tok.rstrip, normalized=tok.normalized, special=True)

    def is_token(value: Any) -> bool:
        return isinstance(value, str) or isinstance(value, dict) and isinstance(value.get("content"), str)

    named = {key: special(config[key]) for key in NAMED_SPECIAL_TOKENS if config.get(key) is not None}
    # Model-specific ones too, e.g. "image_token": "<image>", as transformers 5 does.
    named.update({key: special(value) for key, value in config.items()
                  if key.endswith("_token") and key not in named and is_token(value)})
    listed = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(listed, dict):
        named.update({key: special(value) for key, value in listed.items()})
        listed = []
    return named, [special(value) for value in listed]


def _chat_templates(path: Path, configured: Any) -> dict[str, str]:
    """name -> template. The config holds a string or a list of {name, template}; chat_template.jinja and
    additional_chat_templates/*.jinja (newer checkpoints) take priority, as in transformers."""
    templates: dict[str, str] = {}
    if isinstance(configured, str):
        templates["default"] = configured
    elif isinstance(configured, list):
        for entry in configured:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise TokenizerError(f"{path / 'tokenizer_config.json'}: chat_template entries need a name and a "
                                     f"template, got {entry!r}")
            templates[entry["name"]] = entry["template"]
    elif configured is not None:
        raise TokenizerError(f"{path / 'tokenizer_config.json'}: chat_template must be a string or a list")
    files = {"default": path / "chat_template.jinja"}
    if (path / "additional_chat_templates").is_dir():
        files.update({f.stem: f for f in sorted((path / "additional_chat_templates").glob("*.jinja"))})
    for name, file in files.items():
        if file.is_file():
            try:
                templates[name] = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise TokenizerError(f"{file}: not UTF-8 ({error})") from None
    return templates
