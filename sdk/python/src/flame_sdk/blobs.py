"""Model blobs in the JetStream object store, named by the sha256 of their bytes."""

from __future__ import annotations

import hashlib
import re

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from .protocol import BLOB_BUCKET
from .retry import retrying

_DIGEST = re.compile(r"^[0-9a-f]{64}$")

#: Seconds a blob read or write that fails for want of the server (a NATS
#: restart, a leaf node's link cut) is tried again before it counts as failed.
RETRY_FOR = 60.0

class BlobError(Exception):
    """A blob that is missing, corrupt or misnamed."""


def digest(data: bytes) -> str:
    """A blob's address: the lower-case hex sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


class Blobs:
    """The ``flame-models`` bucket; every read is checked against its name."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    @classmethod
    async def open(cls, js: JetStreamContext) -> "Blobs":
        try:
            store = await js.object_store(BLOB_BUCKET)
        except BucketNotFoundError:
            store = await js.create_object_store(BLOB_BUCKET)
        return cls(store)

    async def get(self, name: str) -> bytes:
        if not _DIGEST.match(name):
            raise BlobError(f"'{name}' is not a sha256 digest (64 lower-case hex characters)")
        return await retrying(f"reading blob {name}", lambda: self._fetch(name), RETRY_FOR, (BlobError,))

    async def _fetch(self, name: str) -> bytes:
        try:
            result = await self._store.get(name)
        except (ObjectNotFoundError, NotFoundError):
            raise BlobError(f"blob {name} not found") from None
        data = bytes(result.data or b"")
        actual = digest(data)
        if actual != name:
            raise BlobError(f"blob {name} is corrupt: its bytes hash to {actual}")
        return data

    async def put(self, data: bytes) -> str:
        name = digest(data)
        await retrying(f"storing blob {name}", lambda: self._store_once(name, data), RETRY_FOR, (BlobError,))
        return name

    async def _store_once(self, name: str, data: bytes) -> None:
        # Kept only when the stored bytes are these bytes: anyone who may write
        # blobs may write other bytes under this name, and this put then puts
        # them right.
        try:
            await self._fetch(name)
            return
        except Exception:
            pass
        try:
            await self._store.put(name, data)
        except Exception as e:
            # A put over a name also purges the old chunks, which a worker's
            # identity may not do; what counts is whether these bytes are there now.
            try:
                await self._fetch(name)
            except BlobError:
                raise ConnectionError(f"blob {name} could not be stored: {e}") from None
