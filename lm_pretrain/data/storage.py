"""Prepared datasets in S3-compatible object storage: `s3://bucket/prefix` wherever a folder goes.

The layout under the prefix is a prepared folder's: train/, val/ and metadata.json. Training
streams the shards with litdata, which caches them on local disk. Everything else (reading
metadata.json, listing shard sizes, uploading a prepared folder) goes through `ObjectStore`: one
boto3 client with short timeouts and few retries, whose failures all become one-line UserErrors. It
runs before litdata touches the store, so a wrong bucket, endpoint or credential is reported within
seconds instead of disappearing into litdata's patient retries.

Where the store is and who you are come from boto3's usual sources: the AWS_* environment variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION,
AWS_PROFILE), ~/.aws, or an instance role. `storage_options` are boto3 client arguments on top of
those, e.g. {"endpoint_url": "http://127.0.0.1:9000"} for MinIO or another S3-compatible store, and
our client's connect_timeout, read_timeout (seconds) and max_attempts (see TIMEOUTS).
"""

import contextlib
import inspect
from pathlib import Path

from lm_pretrain.utils.errors import UserError

SCHEME = "s3://"
# Our own requests fail fast: against an endpoint that never answers, at most max_attempts x
# (connect_timeout + read_timeout) plus botocore's backoff between attempts: 3 x 7 + 3 = 24 s.
# storage_options connect_timeout, read_timeout and max_attempts change them (e.g. a slow store
# behind a proxy). litdata's own client, which streams the shards while training, keeps its long
# retries: a blip mid-run should not end a training run.
TIMEOUTS = {"connect_timeout": 2, "read_timeout": 5, "max_attempts": 3}
DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403"}


def worst_case_seconds(storage_options: dict | None = None) -> float:
    """How long one of our requests can take against an endpoint that never answers."""
    t = {**TIMEOUTS, **{k: v for k, v in (storage_options or {}).items() if k in TIMEOUTS}}
    backoff = sum(min(2 ** i, 20) for i in range(t["max_attempts"] - 1))  # botocore's standard retries: <= 1 s, 2 s, ...
    return t["max_attempts"] * (t["connect_timeout"] + t["read_timeout"]) + backoff


def litdata_options(storage_options: dict | None) -> dict | None:
    """`storage_options` less our own client's settings (TIMEOUTS), for litdata's client."""
    return None if storage_options is None else {k: v for k, v in storage_options.items() if k not in TIMEOUTS}


def is_remote(location) -> bool:
    return str(location).startswith(SCHEME)


def make_client(storage_options: dict | None):
    """A boto3 S3 client from the environment plus `storage_options` (boto3 client arguments)."""
    import boto3
    import botocore.config

    options = dict(storage_options or {})
    timeouts = {key: options.pop(key, default) for key, default in TIMEOUTS.items()}
    for key, value in timeouts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 3600 or \
                (key == "max_attempts" and not isinstance(value, int)):
            raise UserError(f"storage_options: {key} {value!r} must be a number > 0 and < 3600"
                            f"{' (a whole number)' if key == 'max_attempts' else ' (seconds)'}")
    allowed = set(inspect.signature(boto3.session.Session.client).parameters) - {"self", "service_name"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"storage_options: unknown option(s) {', '.join(unknown)}; expected boto3 client arguments "
                        f"such as endpoint_url, region_name, aws_access_key_id, aws_secret_access_key, or our "
                        f"{', '.join(TIMEOUTS)}")
    config = botocore.config.Config(connect_timeout=timeouts["connect_timeout"], read_timeout=timeouts["read_timeout"],
                                    retries={"total_max_attempts": timeouts["max_attempts"], "mode": "standard"})
    theirs = options.pop("config", None)
    if theirs is not None and not isinstance(theirs, botocore.config.Config):
        raise UserError("storage_options: config must be a botocore.config.Config, made in Python; YAML and flags "
                        "take the plain arguments (endpoint_url, region_name, ...)")
    config = config.merge(theirs) if theirs is not None else config
    try:
        return boto3.session.Session().client("s3", config=config, **options)
    except ValueError as err:  # e.g. "Invalid endpoint: 127.0.0.1:9000" (no http:// or https://)
        raise UserError(f"storage_options: {err}") from None
    except Exception as err:  # botocore: a profile that does not exist, a malformed config file, ...
        raise UserError(f"cannot set up the S3 client: {err}") from None


class ObjectStore:
    """Objects below one s3://bucket/prefix, named by their path relative to the prefix."""

    def __init__(self, url: str, storage_options: dict | None = None):
        bucket, _, prefix = str(url).removeprefix(SCHEME).partition("/")
        if not bucket:
            raise UserError(f"{url}: no bucket name; expected s3://BUCKET/PREFIX")
        self.url, self.bucket, self.prefix = str(url).rstrip("/"), bucket, prefix.strip("/")
        self.client = make_client(storage_options)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read(self, name: str) -> bytes | None:
        """The object's bytes, or None if there is no such object."""
        from botocore.exceptions import ClientError

        with self.reporting("read"):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()
            except ClientError as err:
                if _code(err) in ("NoSuchKey", "404"):
                    return None
                raise

    def sizes(self, under: str = "") -> dict[str, int]:
        """{name: bytes} of every object below the prefix (or below its sub-folder `under`)."""
        start = self.key(under.strip("/")) if under else self.prefix
        start = f"{start}/" if start else ""
        sizes = {}
        with self.reporting("list"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    sizes[obj["Key"][len(self.prefix) + 1 if self.prefix else 0:]] = obj["Size"]
        return sizes

    def upload(self, path: Path, name: str) -> None:
        with self.reporting("write"), open(path, "rb") as f:
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=f)

    def delete(self, names: list[str]) -> None:
        with self.reporting("write"):
            for start in range(0, len(names), 1000):  # the most one request may delete
                batch = [{"Key": self.key(n)} for n in names[start:start + 1000]]
                reply = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if reply.get("Errors"):  # one request, but each object can fail on its own
                    first = reply["Errors"][0]
                    raise UserError(f"cannot write {self.url}: deleting s3://{self.bucket}/{first['Key']} failed "
                                    f"({first.get('Code')} {first.get('Message')})")

    @contextlib.contextmanager
    def reporting(self, action: str):
        """Turn what boto3 raises into one UserError line saying what went wrong and what to check."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError, HTTPClientError,
                                         NoCredentialsError, PartialCredentialsError)

        where = f"cannot {action} {self.url}"
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError):
            raise UserError(f"{where}: no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                            f"(or AWS_PROFILE)") from None
        except (ConnectionError, HTTPClientError) as err:
            attempts = (self.client.meta.config.retries or {}).get("total_max_attempts")
            waited = f", gave up after {attempts} attempts" if attempts and "Timeout" in type(err).__name__ else ""
            raise UserError(f"{where}: endpoint {self.client.meta.endpoint_url} is unreachable "
                            f"({type(err).__name__}{waited}); check AWS_ENDPOINT_URL or storage_options endpoint_url "
                            f"(and connect_timeout, read_timeout, max_attempts for a slow store)") from None
        except ClientError as err:
            code = _code(err)
            if code == "NoSuchBucket":
                raise UserError(f"{where}: bucket {self.bucket!r} does not exist") from None
            if code in DENIED:
                raise UserError(f"{where}: access denied ({code}); check the credentials and their "
                                f"permissions") from None
            message = err.response.get("Error", {}).get("Message") or ""
            raise UserError(f"{where}: {code} {message}".rstrip()) from None
        except (BotoCoreError, Boto3Error) as err:
            raise UserError(f"{where}: {' '.join(str(err).split())}") from None


def _code(err) -> str:
    """S3's error code ("NoSuchBucket"), or the HTTP status where the reply has none."""
    response = err.response
    return str(response.get("Error", {}).get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def let_litdata_use_http_endpoints() -> None:
    """Let litdata stream from plain-http endpoints (MinIO or moto on localhost), as boto3 does.

    litdata reads index.json with boto3 but chunks with obstore, whose HTTP client refuses http://
    URLs unless told `allow_http`; litdata builds its client options from one module constant.
    Allowing http changes nothing for https endpoints. Applied in the training process before the
    data loaders start, so forked loader workers inherit it.
    """
    from litdata.streaming import downloader

    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(options, dict) and "allow_http" not in options:
        downloader._OBSTORE_CLIENT_OPTIONS = {**options, "allow_http": True}
