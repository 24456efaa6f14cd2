"""A repository under s3://bucket/prefix, through boto3.

Endpoint, credentials, region and retry mode come the way boto3 users expect
(AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID/..., ~/.aws/config,
AWS_RETRY_MODE, AWS_MAX_ATTEMPTS); keyword options override them. Every call has
a connect and read timeout and a bounded number of attempts, so an unreachable
endpoint ends in a StoreError, never a hang.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import boto3
import botocore.config
import botocore.exceptions as bexc

from snapvisor.store.backend import ObjectInfo, ObjectStore, check_key, check_range
from snapvisor.store.errors import ObjectNotFound, StoreError

MULTIPART_THRESHOLD = 64 << 20
MULTIPART_PART_SIZE = 16 << 20

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                     "InvalidToken", "ExpiredToken", "InvalidClientTokenId", "403"}
_EXISTS_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_NETWORK_ERRORS = (bexc.EndpointConnectionError, bexc.ConnectTimeoutError,
                   bexc.ReadTimeoutError, bexc.ConnectionClosedError, bexc.ProxyConnectionError)


_sessions: dict[str | None, boto3.session.Session] = {}
_sessions_lock = threading.Lock()


def _session(profile: str | None) -> boto3.session.Session:
    """One session per profile: loading botocore's models costs a second per session."""
    session = _sessions.get(profile)
    if session is None:
        try:
            session = _sessions[profile] = boto3.session.Session(profile_name=profile)
        except bexc.ProfileNotFound as e:
            raise StoreError(f"AWS profile {profile!r} not found: {e}") from None
    return session


class S3Store(ObjectStore):
    def __init__(self, url: str, *, endpoint_url: str | None = None, profile: str | None = None,
                 region: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, max_attempts: int | None = None,
                 connect_timeout: float = 5.0, read_timeout: float = 60.0,
                 max_connections: int = 32, multipart_threshold: int = MULTIPART_THRESHOLD,
                 multipart_part_size: int = MULTIPART_PART_SIZE):
        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"repository URL {url!r} names no bucket; use s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        if multipart_part_size < 5 << 20:
            raise StoreError("multipart_part_size must be at least 5 MiB (the S3 minimum)")
        self.multipart_threshold = multipart_threshold
        self.multipart_part_size = multipart_part_size
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL")
        attempts = max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS") or 4)
        self.attempts = attempts
        config = botocore.config.Config(
            retries={"mode": os.environ.get("AWS_RETRY_MODE") or "standard",
                     "max_attempts": attempts},
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            max_pool_connections=max_connections,
            # Self-hosted endpoints (SeaweedFS, MinIO, Ceph) rarely have wildcard DNS.
            s3={"addressing_style": "path"} if endpoint_url else None,
            # Do not add CRC trailers the smaller S3 implementations reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        with _sessions_lock:  # boto3 sessions are not thread-safe; clients are
            session = _session(profile)
            self.endpoint = endpoint_url or f"the AWS default endpoint (region {session.region_name})"
            self._client = session.client(
                "s3", endpoint_url=endpoint_url, config=config,
                region_name=region or session.region_name or "us-east-1",
                aws_access_key_id=access_key, aws_secret_access_key=secret_key)
        self._conditional_put = True  # cleared when the server rejects If-None-Match

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _error(self, e: Exception, action: str, key: str) -> StoreError:
        where = f"{action} {key!r} in {self.url} at {self.endpoint}"
        if isinstance(e, bexc.NoCredentialsError):
            return StoreError(f"{where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                              f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
        if isinstance(e, _NETWORK_ERRORS):
            return StoreError(f"{where}: cannot reach the endpoint after {self.attempts} attempts "
                              f"({e}); check AWS_ENDPOINT_URL and the network")
        if isinstance(e, bexc.ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                return StoreError(f"{where}: bucket {self.bucket!r} does not exist; create it "
                                  f"or fix the repository URL")
            if code in _CREDENTIAL_CODES:
                return StoreError(f"{where}: access denied ({code}); check the credentials "
                                  f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) "
                                  f"and the bucket policy")
            return StoreError(f"{where}: {code}: {e}")
        if isinstance(e, bexc.BotoCoreError):
            return StoreError(f"{where}: {e}")
        raise e

    @staticmethod
    def _code(e: bexc.ClientError) -> str:
        return str(e.response.get("Error", {}).get("Code", ""))

    def put(self, key: str, data) -> bool:
        full = self._key(key)
        view = memoryview(data).cast("B")
        try:
            if not self._conditional_put and self._exists(full):
                return False
            if len(view) >= self.multipart_threshold:
                return self._put_multipart(full, view)
            try:
                self._client.put_object(Bucket=self.bucket, Key=full, Body=view.tobytes()
                                        if not isinstance(data, bytes) else data,
                                        **self._if_absent())
            except bexc.ClientError as e:
                code = self._code(e)
                if code in _EXISTS_CODES:
                    return False
                if code == "NotImplemented" and self._conditional_put:
                    self._conditional_put = False  # older servers: check, then put
                    return self.put(key, data)
                raise
            return True
        except (bexc.ClientError, bexc.BotoCoreError) as e:
            raise self._error(e, "put", key) from None

    def _if_absent(self) -> dict:
        return {"IfNoneMatch": "*"} if self._conditional_put else {}

    def _exists(self, full: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=full)
            return True
        except bexc.ClientError as e:
            if self._code(e) in _NOT_FOUND_CODES:
                return False
            raise

    def _put_multipart(self, full: str, view: memoryview) -> bool:
        upload = self._client.create_multipart_upload(Bucket=self.bucket, Key=full)
        upload_id = upload["UploadId"]
        try:
            parts = []
            size = self.multipart_part_size
            for number, start in enumerate(range(0, len(view), size), 1):
                body = view[start:start + size].tobytes()
                part = self._client.upload_part(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                                PartNumber=number, Body=body)
                parts.append({"PartNumber": number, "ETag": part["ETag"]})
            try:
                self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id,
                    MultipartUpload={"Parts": parts}, **self._if_absent())
            except bexc.ClientError as e:
                if self._code(e) in _EXISTS_CODES:
                    self._abort(full, upload_id)
                    return False
                raise
            return True
        except BaseException:
            self._abort(full, upload_id)
            raise

    def _abort(self, full: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except (bexc.ClientError, bexc.BotoCoreError):
            pass  # the upload expires by the bucket's lifecycle rule, or gc sees it as garbage

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        full = self._key(key)
        try:
            if length == 0:
                size = self.head(key)
                if size is None:
                    raise ObjectNotFound(self.url, key)
                check_range(self.url, key, size, offset, 0)
                return b""
            extra = {}
            if offset or length is not None:
                last = "" if length is None else str(offset + length - 1)
                extra["Range"] = f"bytes={offset}-{last}"
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=full, **extra)
            except bexc.ClientError as e:
                code = self._code(e)
                if code in _NOT_FOUND_CODES:
                    raise ObjectNotFound(self.url, key) from None
                if code in ("InvalidRange", "416"):
                    size = self.head(key) or 0
                    check_range(self.url, key, size, offset, length)
                raise
            data = response["Body"].read()
        except (bexc.ClientError, bexc.BotoCoreError) as e:
            raise self._error(e, "get", key) from None
        if length is not None and len(data) != length:
            raise StoreError(f"object {key!r} in {self.url} is truncated: asked for bytes "
                             f"{offset}..{offset + length}, got {len(data)}")
        return data

    def head(self, key: str) -> int | None:
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return int(response["ContentLength"])
        except bexc.ClientError as e:
            if self._code(e) in _NOT_FOUND_CODES:
                return None
            raise self._error(e, "head", key) from None
        except bexc.BotoCoreError as e:
            raise self._error(e, "head", key) from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        skip = len(self.prefix)
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix)
            for page in pages:
                for item in page.get("Contents", ()):
                    yield ObjectInfo(item["Key"][skip:], int(item["Size"]))
        except (bexc.ClientError, bexc.BotoCoreError) as e:
            raise self._error(e, "list", prefix) from None

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except bexc.ClientError as e:
            if self._code(e) in _NOT_FOUND_CODES:
                return
            raise self._error(e, "delete", key) from None
        except bexc.BotoCoreError as e:
            raise self._error(e, "delete", key) from None

    def sweep(self, older_than: float) -> int:
        # Unfinished multipart uploads hold (billed) space but no object; a writer
        # killed in the middle of a large put leaves one.
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than)
        aborted = 0
        try:
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for upload in page.get("Uploads", ()):
                    if upload["Initiated"] < cutoff:
                        self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                            UploadId=upload["UploadId"])
                        aborted += 1
        except (bexc.ClientError, bexc.BotoCoreError) as e:
            raise self._error(e, "sweep", "unfinished uploads") from None
        return aborted

    def close(self) -> None:
        self._client.close()
