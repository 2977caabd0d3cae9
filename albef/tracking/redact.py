"""Secrets kept out of what albef shows: MLflow params, tags and artifacts, log lines, error messages.

Two kinds of secret are recognised:

* credentials inside a URI: ``http://alice:s3cr3t@host`` -> ``http://alice:***@host``; a bare token as the user
  of an http(s) URI (``https://ghp_x@github.com/...``) -> ``https://***@github.com/...``; secret query values
  (``?token=...``, ``access_key``, ``password``, presigned-URL signatures) -> ``***``;
* values of keys named like secrets (:func:`is_secret_key`): ``password``, ``api_key``, ``mlflow.auth_token``.

Only what is shown is redacted: the real URI is still the one albef connects to. This module imports nothing
heavy (no mlflow), so the configuration's error messages can use it.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"

# A key part (the text between dots, lower-cased, camelCase and '-' turned into '_') names a secret when it is one
# of these words ...
_SECRET_PARTS = frozenset({"token", "secrets", "authorization", "id_token"})
# ... or one of these, alone or as its end after a '_' (db_password, aws_secret_access_key, client_secret,
# hf_api_token). Deliberately no "_token" suffix and no "tokens": tokenizer settings (pad_token, cls_token_id,
# max_tokens, tokenizer) are not secrets.
_SECRET_SUFFIXES = frozenset(
    {
        "password",
        "passwd",
        "secret",
        "api_key",
        "apikey",
        "api_token",
        "auth_token",
        "access_token",
        "refresh_token",
        "session_token",
        "security_token",
        "bearer_token",
        "access_key",
        "secret_key",
        "private_key",
        "credential",
        "credentials",
    }
)
# Query parameters of presigned URLs (S3, GCS, Azure SAS) that grant access by themselves.
_QUERY_SECRETS = frozenset(
    {"sig", "signature", "x_amz_signature", "x_amz_credential", "x_goog_signature", "x_goog_credential"}
)

_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
# scheme://userinfo@ : userinfo runs to the last '@' before the host ('@' in a password is common enough)
_URI_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s'\"<>`]*)@")
# user:password@host without a scheme (a malformed URI an error message echoes)
_BARE_USERINFO = re.compile(r"(?P<user>[^\s:/@'\"<>`]+):(?P<password>[^\s/@'\"<>`]+)@")
# name=value in a query string
_QUERY_ITEM = re.compile(r"(?P<lead>[?&;#])(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^&#;\s'\"<>`]*)")
_TOKEN_USER_SCHEMES = ("http", "https", "ws", "wss")


def _parts(name: str) -> list[str]:
    return [part.replace("-", "_").lower() for part in _CAMEL.sub(r"\1_\2", str(name)).split(".")]


def _secret_part(part: str) -> bool:
    return part in _SECRET_PARTS or any(part == w or part.endswith("_" + w) for w in _SECRET_SUFFIXES)


def is_secret_key(name: Any) -> bool:
    """Whether a (dotted) key names a secret: any of its parts is ``password``, ``secret``, ``token``, ``api_key``,
    ``access_key``, ``credentials`` ... or ends with ``_<one of them>``. ``tokenizer``, ``max_tokens``,
    ``cls_token_id`` and ``pad_token`` are not secrets."""
    return any(_secret_part(part) for part in _parts(str(name)))


def _userinfo(match: re.Match[str]) -> str:
    scheme, userinfo = match["scheme"], match["userinfo"]
    if not userinfo or userinfo == REDACTED:
        return match[0]
    user, colon, _password = userinfo.partition(":")
    if colon:
        return f"{scheme}{user}:{REDACTED}@"
    if scheme[:-3].lower() in _TOKEN_USER_SCHEMES:  # https://<token>@github.com: the user is the token
        return f"{scheme}{REDACTED}@"
    return match[0]  # ssh://git@host, postgresql://user@host: a user name alone is no secret


def _query_item(match: re.Match[str]) -> str:
    name = match["name"]
    if match["value"] and (is_secret_key(name) or name.replace("-", "_").lower() in _QUERY_SECRETS):
        return f"{match['lead']}{name}={REDACTED}"
    return match[0]


def redact_text(text: Any) -> Any:
    """``text`` with the credentials of every URI in it redacted (anything but a string comes back as is)."""
    if not isinstance(text, str) or not any(c in text for c in "@=") or not text:
        return text
    text = _URI_USERINFO.sub(_userinfo, text)
    text = _BARE_USERINFO.sub(
        lambda m: m[0] if m["password"] == REDACTED else f"{m['user']}:{REDACTED}@", text
    )
    return _QUERY_ITEM.sub(_query_item, text)


# ``uri`` as it may be shown: ``user:password@`` -> ``user:***@``, a token as the user of an http(s) URI -> ``***@``,
# secret query values -> ``***``. Well-formed or not: a malformed URI is echoed by error messages.
redact_uri = redact_text


def redact(values: Any) -> Any:
    """A copy of ``values`` (nested mappings, lists, strings) to show: the value of every key named like a secret
    becomes ``***`` (a missing or empty one stays as it is), and every string has its URIs' credentials
    redacted."""
    if isinstance(values, dict):
        return {
            key: (REDACTED if _has_value(value) else value) if is_secret_key(key) else redact(value)
            for key, value in values.items()
        }
    if isinstance(values, list):
        return [redact(value) for value in values]
    if isinstance(values, tuple):
        return tuple(redact(value) for value in values)
    return redact_text(values)


def _has_value(value: Any) -> bool:
    return value is not None and not (isinstance(value, str | dict | list | tuple) and not value)
