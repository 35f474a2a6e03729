"""One secret detector: credentials are refused by name, and nothing written (config.yaml,
checkpoints, W&B, error messages) holds a password, a URL's userinfo or a storage option's value
off the allow list."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dist_kp.config import ConfigError, config_to_yaml, load_config
from dist_kp.config.secrets import is_secret_key, public_storage_options, redact_text, redact_url
from tests.conftest import TINY_CONFIG, check, child_env, run_module, tiny_overrides

PLANTED = "Pl4ntedS3cretValue"


@pytest.mark.parametrize("key", [
    # s3fs / botocore
    "key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "SSECustomerKey",
    # adlfs (Azure), gcsfs
    "account_key", "sas_token", "connection_string", "credential", "client_secret", "AccountKey",
    # http, sftp / ssh, ftp, W&B
    "Authorization", "password", "passwd", "passphrase", "pkey", "key_filename", "api_key", "apiKey",
])
def test_credential_option_names_of_fsspec_backends_are_secret(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", [
    "endpoint_url", "region", "region_name", "anon", "use_ssl", "requester_pays", "account_name", "client_id",
    "SSEKMSKeyId", "profile", "keypoint_head_layers", "keep_last", "author", "notes", "headers",
])
def test_ordinary_names_are_not_secret(key: str) -> None:
    assert not is_secret_key(key)


def test_redact_url_removes_userinfo_and_query_strings_anywhere_in_a_text() -> None:
    text = f"cannot read http://user:{PLANTED}@host/coco and https://h/w.pt?X-Amz-Signature={PLANTED} now"
    assert redact_url(text) == "cannot read http://<redacted>@host/coco and https://h/w.pt?<redacted> now"
    # A password with an unescaped "/" or "@" is redacted whole, not cut at the first one.
    assert PLANTED not in redact_url(f"s3://ak:{PLANTED[:5]}/@{PLANTED[5:]}@host/bucket")


def test_redact_text_removes_secret_assignments_and_storage_option_overrides() -> None:
    connection = f"DefaultEndpointsProtocol=https;AccountName=acc;AccountKey={PLANTED};EndpointSuffix=core"
    assert redact_text(connection) == \
        "DefaultEndpointsProtocol=https;AccountName=acc;AccountKey=<redacted>;EndpointSuffix=core"
    assert redact_text(f"{{'password': '{PLANTED}', 'n': 1}}") == "{'password': '<redacted>', 'n': 1}"
    assert redact_text(f"Authorization: Bearer {PLANTED}") == "Authorization: <redacted>"
    assert redact_text(f"notes=password={PLANTED}") == "notes=password=<redacted>"
    # An override of an option off the allow list, or of the whole section, shows no value at all.
    assert redact_text(f"storage.options.foo=x{PLANTED}") == "storage.options.foo=<redacted>"
    assert redact_text(f"storage.options={{foo: {PLANTED}}}") == "storage.options=<redacted>"
    assert redact_text(f"storage.options.endpoint_url=http://u:{PLANTED}@h:9") == \
        "storage.options.endpoint_url=http://<redacted>@h:9"
    assert redact_text("storage.timeout_s=5") == "storage.timeout_s=5"


def test_only_allow_listed_storage_options_keep_their_values() -> None:
    options = {"endpoint_url": f"http://u:{PLANTED}@h:9", "anon": False, "foo": f"AccountKey={PLANTED}",
               "client_kwargs": {"region_name": "eu-1", "verify": False, "extra": PLANTED},
               "config_kwargs": {"read_timeout": 5, "s3": {"addressing_style": "path"}},
               "headers": {"X-Custom": PLANTED}}
    assert public_storage_options(options) == {
        "endpoint_url": "http://<redacted>@h:9", "anon": False, "foo": "<redacted>",
        "client_kwargs": {"region_name": "eu-1", "verify": False, "extra": "<redacted>"},
        "config_kwargs": {"read_timeout": 5, "s3": {"addressing_style": "path"}},
        "headers": {"X-Custom": "<redacted>"}}


@pytest.mark.parametrize("override, key", [
    (f"storage.options.connection_string=AccountKey={PLANTED}", "storage.options.connection_string"),
    (f"storage.options.credential={PLANTED}", "storage.options.credential"),
    (f"storage.options.passwd={PLANTED}", "storage.options.passwd"),
    (f"storage.options.account_key={PLANTED}", "storage.options.account_key"),
    (f"storage.options.sas_token={PLANTED}", "storage.options.sas_token"),
    (f"storage.options.headers={{Authorization: Bearer {PLANTED}}}", "storage.options.headers.Authorization"),
    (f"storage.options.client_kwargs.aws_session_token={PLANTED}", "storage.options.client_kwargs.aws_session_token"),
])
def test_credential_options_are_refused_naming_the_key_without_echoing_the_value(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"  {key}: credentials do not belong in the config") as error:
        load_config(TINY_CONFIG, [override])
    assert PLANTED not in str(error.value)


def test_credentials_in_a_config_file_are_refused_without_echoing_them(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(f"storage:\n  options:\n    connection_string: AccountKey={PLANTED}\n")
    with pytest.raises(ConfigError, match=r"storage\.options\.connection_string: credentials") as error:
        load_config(path)
    assert PLANTED not in str(error.value) and str(path) in str(error.value)


def test_url_password_never_reaches_the_written_config_nor_error_messages() -> None:
    root = f"http://user:{PLANTED}@host/coco"
    cfg = load_config(TINY_CONFIG, [f"data.root={root}", f"model.weights=https://h/w.pt?sig={PLANTED}"])
    assert cfg.data.root == root  # the run itself uses the real URL
    written = config_to_yaml(cfg)
    assert PLANTED not in written
    assert yaml.safe_load(written)["data"]["root"] == "http://<redacted>@host/coco"
    for overrides in ([f"data.root={root}", "train.batch_size=0"], [f"data.root=[{root}]"]):
        with pytest.raises(ConfigError) as error:
            load_config(TINY_CONFIG, overrides)
        assert PLANTED not in str(error.value) and "<redacted>" in str(error.value)


def test_storage_option_values_off_the_allow_list_are_never_dumped() -> None:
    cfg = load_config(TINY_CONFIG, [f"storage.options.foo=AccountKey={PLANTED}", "storage.options.region=eu-1",
                                    f"storage.options.client_kwargs={{extra: {PLANTED}}}"])
    assert cfg.storage.options["foo"] == f"AccountKey={PLANTED}"  # passed to fsspec as given
    dumped = cfg.model_dump(mode="json")  # config.yaml, checkpoints and W&B are written from this
    assert PLANTED not in str(dumped) and PLANTED not in config_to_yaml(cfg)
    assert dumped["storage"]["options"] == {"foo": "<redacted>", "region": "eu-1",
                                            "client_kwargs": {"extra": "<redacted>"}}


def test_no_planted_secret_in_any_file_of_the_run_nor_its_wandb_run(synthetic_root: Path, tmp_path: Path) -> None:
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, out, "train.max_steps=2", "train.workers=0", "checkpoint.every_steps=1",
        "eval.every_epochs=0", "eval.at_end=false", "tracking.mode=offline",
        # Options a local run does not use, but they are in its config: none of their values may be written.
        f"storage.options.foo=AccountKey={PLANTED}", f"storage.options.endpoint_url=http://ci:{PLANTED}@127.0.0.1:9",
        f"storage.options.client_kwargs={{extra: {PLANTED}}}")]
    env = child_env(WANDB_DIR=str(wandb_dir), WANDB_CONFIG_DIR=str(wandb_dir / "config"),
                    WANDB_CACHE_DIR=str(wandb_dir / "cache"), WANDB_DATA_DIR=str(wandb_dir / "data"),
                    WANDB_BASE_URL="http://127.0.0.1:9", WANDB_SILENT="true")
    env["WANDB_MODE"] = "offline"
    result = check(run_module("dist_kp.train", args, env=env, timeout=300))
    files = [p for p in [*out.rglob("*"), *wandb_dir.rglob("*")] if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".pt" for p in files)
    assert any(p.suffix == ".wandb" for p in files), "no W&B run written"
    leaks = [str(p) for p in files if PLANTED.encode() in p.read_bytes()]
    assert not leaks and PLANTED not in result.stderr + result.stdout, leaks
