"""How much work one request may ask for: checked at the door, before any of that work starts.

Both the engine and the tokenizer apply these to their GenerateRequest before fanning out `n` samples,
tokenizing, converting sampling parameters or forwarding anything. A request over a limit is INVALID_ARGUMENT
(`InvalidParam`, so the message starts with the field's name and says the limit); no retry can fix it, so it is
never RESOURCE_EXHAUSTED. The limits are per server (CLI flags, see cli.py); the request_id rule is fixed and
the same for every server, since ids travel between them as `x-request-id` metadata.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from tessera.sampling_params import InvalidParam

# request_id: printable ASCII without spaces, as a gRPC metadata value, a log field and a metric label can carry.
REQUEST_ID_MAX_CHARS = 128
# Toward the engine the tokenizer names sample i of a call "<request_id>@<call tag>/<i>" (a random tag per call,
# so two clients' calls with the same id never meet); the engine takes that many characters more.
CALL_TAG_CHARS = 12
SAMPLE_SUFFIX_CHARS = len("@" + "f" * CALL_TAG_CHARS + "/4294967295")
_REQUEST_ID = re.compile(r"[!-~]+")

# Servers' grpc.max_receive_message_length (--max-request-bytes). Replies may be bigger (prompt logprobs).
MAX_REQUEST_BYTES = 4 << 20
MAX_WORKER_REQUEST_BYTES = 64 << 20  # the worker's one client is the engine: a step plan for a full batch


@dataclass(frozen=True)
class Limits:
    max_n: int = 16  # samples per request
    max_prompt_bytes: int = 1 << 20  # tokenizer: UTF-8 bytes of `text`, of the messages, of the rendered chat
    max_stop_strings: int = 16  # tokenizer: stopping.stop entries
    max_stop_string_chars: int = 256  # tokenizer: characters of each stop string
    max_logit_bias: int = 1024  # sampling.logit_bias entries
    max_stop_token_ids: int = 256  # stopping.stop_token_ids entries


def check_request_id(request_id: str, max_chars: int = REQUEST_ID_MAX_CHARS, source: str = "request_id") -> str:
    """`request_id` if it is 1 to `max_chars` printable ASCII characters without spaces; InvalidParam if not.
    Empty is fine too (the server then makes one up)."""
    if not request_id:
        return request_id
    if len(request_id) > max_chars:
        raise InvalidParam("request_id", f"{source} is {len(request_id)} characters; at most {max_chars} are allowed")
    if not _REQUEST_ID.fullmatch(request_id):
        bad = next(c for c in request_id if not "!" <= c <= "~")
        raise InvalidParam("request_id", f"{source} may only hold printable ASCII without spaces (0x21-0x7e); "
                                         f"it has {ascii(bad)} at {request_id.index(bad)}")
    return request_id


def check_generation(request, limits: Limits) -> None:
    """The counts of an engine or tokenizer GenerateRequest (the same field names in both): O(1), nothing is
    copied or converted. Stop strings are the tokenizer's only (the engine refuses any)."""
    if request.n > limits.max_n:
        raise InvalidParam("n", f"at most {limits.max_n} samples per request, got {request.n}")
    _at_most("sampling.logit_bias", len(request.sampling.logit_bias), limits.max_logit_bias, "entries")
    _at_most("stopping.stop_token_ids", len(request.stopping.stop_token_ids), limits.max_stop_token_ids, "token ids")


def check_stop_strings(stop, limits: Limits) -> None:
    _at_most("stopping.stop", len(stop), limits.max_stop_strings, "stop strings")
    for i, s in enumerate(stop):
        if not s:
            raise InvalidParam(f"stopping.stop[{i}]", "must not be empty")
        if len(s) > limits.max_stop_string_chars:
            raise InvalidParam(f"stopping.stop[{i}]", f"{len(s)} characters; at most "
                                                      f"{limits.max_stop_string_chars} are allowed")


def check_prompt_bytes(field: str, size: int, limits: Limits, what: str = "") -> None:
    if size > limits.max_prompt_bytes:
        raise InvalidParam(field, f"{what or 'the prompt'} is {size} bytes (UTF-8); at most "
                                  f"{limits.max_prompt_bytes} are allowed")


def check_messages(messages, limits: Limits) -> None:
    """The roles and contents together, before any template runs (the rendered prompt is checked after)."""
    size = 0
    for message in messages:
        size += len(message.role.encode()) + len(message.content.encode())
        if size > limits.max_prompt_bytes:
            raise InvalidParam("messages", f"the roles and contents come to more than {limits.max_prompt_bytes} "
                                           f"bytes (UTF-8), the most allowed")


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a seeded request: seed + index, wrapped into int64 (the wire type), so
    that the n samples differ, the same request gives the same samples, and a seed near 2**63 cannot overflow."""
    return (seed + index + 2**63) % 2**64 - 2**63


def _at_most(field: str, count: int, limit: int, what: str) -> None:
    if count > limit:
        raise InvalidParam(field, f"at most {limit} {what} per request, got {count}")
