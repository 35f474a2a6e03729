"""What of a run may be written down: one rule for credentials in keys, URLs, options and text.

    is_secret_key("aws_secret_access_key")        # True: refused in a config, redacted in any dump
    redact_url("http://user:pw@host/x?sig=abc")   # 'http://<redacted>@host/x?<redacted>'
    redact_text("AccountKey=abc;region=eu")       # 'AccountKey=<redacted>;region=eu' (+ redact_url)
    redact({"opts": {"token": "t"}})              # nested copy: {'opts': {'token': '<redacted>'}}
    public_storage_options(cfg.storage.options)   # only allow-listed fsspec options keep their values

Credentials come from the environment or a provider's credential chain, never from the config:
the config refuses keys `is_secret_key` names, and every dump (config.yaml, checkpoints, W&B),
log line and error message shows only what these functions leave.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"

# Words of a key (snake_case, kebab-case, dotted or CamelCase: SSEKMSKeyId -> sse kms key id).
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
# Found anywhere in the key with its separators removed (aws_secret_access_key, AccountKey, passwd).
SECRET_FRAGMENTS = ("secret", "passw", "passphrase", "credential", "token", "apikey", "accesskey", "accountkey",
                    "privatekey", "signature", "connectionstring", "cookie")
# Whole words only: as fragments they would hit keypoint_*, author, passive ...
# (fsspec: s3fs key, sftp pkey / pass, http auth / Authorization; Azure SAS sig / sas).
SECRET_WORDS = frozenset({"key", "keys", "pkey", "pass", "pwd", "auth", "authorization", "bearer", "creds",
                          "sas", "sig"})

# fsspec options whose values hold no credential, written as they are (URLs still redacted); any
# other option's value is written as <redacted>. "x.*" allows everything under x.
PUBLIC_STORAGE_OPTIONS = frozenset({
    # dist_kp's own shortcuts (storage.Storage), then s3fs, gcsfs, adlfs and fsspec settings.
    "endpoint_url", "region", "anon", "use_ssl", "requester_pays", "default_block_size", "default_fill_cache",
    "default_cache_type", "version_aware", "cache_regions", "skip_instance_cache", "use_listings_cache",
    "listings_expiry_time", "max_paths", "max_concurrency", "fixed_upload_size", "profile", "project", "access",
    "consistency", "account_name", "block_size", "timeout",
    "client_kwargs.endpoint_url", "client_kwargs.region_name", "client_kwargs.verify", "client_kwargs.use_ssl",
    "client_kwargs.api_version",
    "config_kwargs.*",
    "s3_additional_kwargs.ServerSideEncryption", "s3_additional_kwargs.StorageClass", "s3_additional_kwargs.ACL",
})

_SCHEME = r"\b[a-zA-Z][\w+.-]*://"
# Up to the last "@" before a space: a password with an unescaped "/", "@" or quote is redacted whole too.
_URL_USERINFO = re.compile(rf"({_SCHEME})\S*@")
_URL_QUERY = re.compile(rf"({_SCHEME}[^?\s'\"]*)\?[^\s'\"]*")
# NAME=VALUE or NAME: VALUE (also quoted, as in a dict's repr), the value up to a delimiter.
_ASSIGNMENT = re.compile(r"""(?P<key>[A-Za-z_][\w.\-]*)(?P<sep>["']?\s*[=:]\s*["']?)"""
                         r"""(?P<value>(?:(?:Bearer|Basic|Digest|Token)\s+)?[^\s"',;&}\]]+)""")
# A command-line override of the storage options: storage=..., storage.options=..., storage.options.X=...
_STORAGE_OVERRIDE = re.compile(r"(?P<key>storage(?:\.options(?:\.(?P<path>[\w.]+))?)?)=(?P<value>.*)", re.DOTALL)


def is_secret_key(name: str) -> bool:
    """True when a key names a credential (password, token, account key, SAS token, auth header ...)."""
    words = [w.lower() for w in _WORD.findall(str(name))]
    joined = "".join(words)
    if any(fragment in joined for fragment in SECRET_FRAGMENTS):
        return True
    # A key id (SSEKMSKeyId, key_id) names a key, it is not one; aws_access_key_id is caught above.
    return any(w in SECRET_WORDS and not (w == "key" and words[i + 1:i + 2] == ["id"]) for i, w in enumerate(words))


def secret_key_paths(tree: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every secret-named key in nested dicts (and lists of them), in order."""
    found: list[str] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if is_secret_key(str(key)):
                found.append(path)
            else:
                found += secret_key_paths(value, f"{path}.")
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            found += secret_key_paths(value, prefix)
    return found


def redact_url(text: str) -> str:
    """`text` with the user:password@ and the query string of every URL in it replaced by <redacted>."""
    # Query first: an "@" in a query string is not userinfo.
    return _URL_USERINFO.sub(rf"\1{REDACTED}@", _URL_QUERY.sub(rf"\1?{REDACTED}", text))


def _redact_assignment(match: re.Match) -> str:
    if is_secret_key(match["key"]):
        return f"{match['key']}{match['sep']}{REDACTED}"
    # The value may itself be one: notes=password=X, AccountName=a;AccountKey=X.
    return f"{match['key']}{match['sep']}{_ASSIGNMENT.sub(_redact_assignment, match['value'])}"


def redact_text(text: str) -> str:
    """Free text (a log line, an error message, an argument) without credentials.

    URLs as `redact_url`; the value of every NAME=VALUE / NAME: VALUE whose NAME is secret;
    and a command-line override of storage options unless it sets one allow-listed option.
    """
    storage = _STORAGE_OVERRIDE.fullmatch(text)
    if storage and not (storage["path"] and is_public_storage_option(storage["path"])
                        and not storage["value"].lstrip().startswith(("{", "["))):
        return f"{storage['key']}={REDACTED}"
    return _ASSIGNMENT.sub(_redact_assignment, redact_url(text))


def redact(value: Any) -> Any:
    """A copy of nested dicts / lists / strings: secret keys' values <redacted>, strings as `redact_text`."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def is_public_storage_option(path: str) -> bool:
    """True for a dotted fsspec option path (client_kwargs.region_name) on the allow list."""
    return path in PUBLIC_STORAGE_OPTIONS or any(
        path.startswith(allowed[:-1]) for allowed in PUBLIC_STORAGE_OPTIONS if allowed.endswith(".*"))


def public_storage_options(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The options as they may be written: allow-listed values (redacted as `redact`), all others <redacted>."""
    shown: dict[str, Any] = {}
    for key, value in options.items():
        path = f"{prefix}{key}"
        if is_public_storage_option(path):
            shown[key] = redact(value)
        elif isinstance(value, dict):
            shown[key] = public_storage_options(value, f"{path}.")
        else:
            shown[key] = REDACTED
    return shown
