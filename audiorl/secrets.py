"""One rule for what a secret looks like, used everywhere a value could leave the process: the
rendered ConfigMap and pod spec (refused there, since the job would need the value), MLflow
params and tags, spill files, logs and error messages (redacted there).

A value is secret by its key's name (`HF_TOKEN`, `apiKey`, `db_password`; whole words, so
`max_target_tokens` is not) or by its shape: the prefixes of common tokens (Hugging Face, OpenAI,
GitHub, GitLab, Slack, AWS access keys, Google API keys, JWTs), a URL with user information (a
password, or a user alone: `https://TOKEN@host`, `https://:SECRET@host`), or a URL query parameter
that carries a credential (`?token=`, `access_token=`, `api_key=`, `sig=`, `X-Amz-Signature=`, ...).
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"

_SECRET_WORDS = {"token", "secret", "password", "passwd", "pwd", "credential", "credentials", "apikey", "accesskey"}

# (what it is, pattern); each pattern matches the secret part only
_TOKEN_SHAPES = [
    ("a Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{20,}")),
    ("an OpenAI-style key", re.compile(r"\bsk-(?:proj-|live-|test-)?[A-Za-z0-9_-]{16,}")),
    ("a Stripe-style key", re.compile(r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}")),
    ("a GitHub token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})")),
    ("a GitLab token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}")),
    ("a Slack token", re.compile(r"\bxox[abpors]-[A-Za-z0-9-]{10,}")),
    ("an AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("a Google API key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}")),
    ("a JSON web token", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
]
# scheme://USER[:PASSWORD]@host: the user information, whatever it holds (a token as the user,
# an empty user with a password, user:password)
_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<info>[^/@\s?#]*)@", re.IGNORECASE)
_QUERY_KEYS = r"(?:token|access_token|id_token|refresh_token|auth|auth_token|api_key|apikey|key|secret|password|passwd|pwd|sig|signature|" \
              r"x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|sas|code)"
_QUERY = re.compile(rf"(?P<lead>[?&;]{_QUERY_KEYS}=)(?P<value>[^&#\s]+)", re.IGNORECASE)


def is_secret_key(name: str) -> bool:
    """Does a key or variable name say it holds a secret? Whole words only, so HF_TOKEN,
    apiKey and AWS_SECRET_ACCESS_KEY are secrets while max_target_tokens and
    TOKENIZERS_PARALLELISM are not."""
    words = [w.lower() for w in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", str(name))]
    pairs = {a + b for a, b in zip(words, words[1:])}
    return bool(_SECRET_WORDS & (set(words) | pairs))


def secret_shape(value: Any) -> str | None:
    """What kind of secret `value` holds (a token, URL user information, a credential in a
    query), or None when it looks like none."""
    if not isinstance(value, str):
        return None
    for what, pattern in _TOKEN_SHAPES:
        if pattern.search(value):
            return what
    if _USERINFO.search(value):
        return "credentials in a URL (user information before '@')"
    if _QUERY.search(value):
        return "a credential in a URL query"
    return None


def has_uri_password(value: str) -> bool:
    """True when `value` holds a URL with user information (scheme://user:password@host, or a
    token or an empty user before the '@')."""
    return isinstance(value, str) and _USERINFO.search(value) is not None


def redact(value: Any) -> Any:
    """`value` with every secret part replaced by `***` (strings; anything else as it is)."""
    if not isinstance(value, str):
        return value
    out = _USERINFO.sub(_redact_userinfo, value)
    out = _QUERY.sub(lambda m: f"{m['lead']}{REDACTED}", out)
    for _, pattern in _TOKEN_SHAPES:
        out = pattern.sub(REDACTED, out)
    return out


def _redact_userinfo(match: re.Match[str]) -> str:
    """user:password keeps the user; a user alone (often a token) goes whole."""
    info = match["info"]
    if not info:
        return match[0]
    user, colon, _ = info.partition(":")
    return f"{match['scheme']}{user}:{REDACTED}@" if colon else f"{match['scheme']}{REDACTED}@"


def redact_tree(value: Any, key: str = "") -> Any:
    """A nested structure with secret-named keys' values and secret-shaped strings redacted."""
    if key and is_secret_key(key) and value not in (None, "", [], {}):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact_tree(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v) for v in value)
    return redact(value)


def find_secrets(value: Any, path: str = "", *, skip: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """(dotted key path, why) for every secret in a nested structure: a secret-named key with a
    value, or a secret-shaped string. Paths in `skip` (and below them) are not looked at."""
    if path in skip:
        return []
    found: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if child in skip:
                continue
            if is_secret_key(str(key)) and item not in (None, "", [], {}, False, 0):
                found.append((child, f"its name {key!r} says it holds a secret"))
            else:
                found += find_secrets(item, child, skip=skip)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found += find_secrets(item, f"{path}[{i}]", skip=skip)
    else:
        what = secret_shape(value)
        if what:
            found.append((path, f"the value looks like {what}"))
    return found
