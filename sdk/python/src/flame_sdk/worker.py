"""The worker runtime: register, heartbeat, take commands, run them, report.

It does what the Rust runtime (``flame-worker``) does for a worker:
registration and heartbeats in the ``flame-workers`` KV bucket; the durable
pull consumer ``worker-<id>`` on ``FLAME_CMDS`` with an explicit ack sent only
after the report is published (a worker that dies mid-command gets it
again); command ids as idempotency keys (a repeat is answered with the same
report, without running again); blobs by sha256 in the object store, checked
on every read; a ``failed`` report carrying the Python error's message; a
graceful stop (on SIGTERM with :func:`serve`) that lets commands in flight
report.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import json
import logging
import os
import secrets
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import nats
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import KeyNotFoundError, NotFoundError

from . import protocol, weights
from .blobs import BlobError, Blobs
from .data import DataRoots, Refused
from .protocol import Command, ProtocolError
from .retry import retrying
from .trainer import Aggregator, FedAvg, Hyperparameters, Metrics, Trainer, Unsupported, Update
from .weights import Model, WeightsError

log = logging.getLogger("flame_sdk")

#: How many finished commands a worker remembers to answer repeats.
REMEMBERED = 4096
#: The SDK's own errors: their message is the whole story.
_PLAIN = (ProtocolError, BlobError, WeightsError, Unsupported, Refused)


def describe(e: BaseException) -> str:
    """A failed report's message: the error and where user code raised it."""
    text = f"{e}" if isinstance(e, _PLAIN) else f"{type(e).__name__}: {e}"
    if isinstance(e, _PLAIN):
        return text
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        f = frames[-1]
        text += f" (at {os.path.basename(f.filename)}:{f.lineno} in {f.name})"
    return text


class IdTaken(Exception):
    """Another live process is registered under this worker's id."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(
            f"worker id '{worker_id}' is in use by another live process (its registration was renewed while this one waited): "
            "two processes cannot be one worker; give this one an id of its own (--id), or stop the other first"
        )
        self.worker_id = worker_id


class _DomainJetStream(JetStreamContext):
    """JetStream in the hub's domain, for a worker behind a leaf node: its API
    requests go to ``$JS.<domain>.API``, and so do its registry writes
    (``$KV.`` subjects), which reach the hub's bucket only under that prefix
    (as the Rust client sends them); blob chunks and reports travel as they are."""

    def __init__(self, conn: Client, domain: str) -> None:
        super().__init__(conn, domain=domain)
        self._write_prefix = f"$JS.{domain}.API."

    async def publish(self, subject: str, *args: Any, **kwargs: Any) -> api.PubAck:
        if subject.startswith("$KV."):
            subject = self._write_prefix + subject
        return await super().publish(subject, *args, **kwargs)


class Worker:
    """One worker identity.

    ``trainer`` is a class (or any callable with no arguments) making a
    :class:`Trainer`; the worker makes one per dataset it is given.
    ``aggregator`` is an :class:`Aggregator` for jobs whose aggregator task
    this worker takes (``roles`` with ``aggregator``); FedAvg when absent.
    """

    def __init__(
        self,
        worker_id: str,
        *,
        trainer: Optional[Callable[[], Trainer]] = None,
        aggregator: Optional[Aggregator] = None,
        roles: Optional[List[str]] = None,
        realm: str = "default",
        device: str = "cpu",
        concurrency: int = 1,
        data_roots: Optional[List[str]] = None,
    ) -> None:
        self.id = protocol.check_id(worker_id, "worker id")
        if roles is None:
            roles = (["trainer"] if trainer else []) + (["aggregator"] if aggregator else [])
        if not roles:
            raise ValueError("a worker needs a trainer, an aggregator, or roles")
        if "trainer" in roles and trainer is None:
            raise ValueError("a worker offering the trainer role needs a trainer class")
        self.roles = list(roles)
        self.realm = realm
        self.device = device
        self.concurrency = max(1, concurrency)
        # Datasets are read under these folders only (default: the folder it starts in).
        self.data_roots = DataRoots(data_roots if data_roots is not None else [os.getcwd()])
        self._make_trainer = trainer
        self._aggregator = aggregator or FedAvg()
        self._trainers: Dict[str, Trainer] = {}
        self._trainer_lock = asyncio.Lock()
        self._done: "collections.OrderedDict[str, Dict[str, Any]]" = collections.OrderedDict()
        self._running: Dict[str, "asyncio.Future[Dict[str, Any]]"] = {}
        self.nc: Optional[Client] = None
        self.js: Optional[JetStreamContext] = None
        self.blobs: Optional[Blobs] = None
        # This process's mark in the registrations it writes (see claim_id).
        self.instance = secrets.token_hex(8)

    # ---- connection --------------------------------------------------------

    async def connect(self, url: str, **options: Any) -> None:
        """Connects (``options`` go to ``nats.connect``: credentials, TLS;
        ``domain``, the hub's JetStream domain for a worker behind a leaf
        node, goes to JetStream) and creates the streams, bucket and object
        store if they are missing."""
        domain: Optional[str] = options.pop("domain", None)
        async def error(e: Exception) -> None:
            log.warning("NATS: %s", e)

        async def disconnected() -> None:
            log.warning("disconnected from NATS; reconnecting")

        async def reconnected() -> None:
            log.info("reconnected to NATS")

        # Replies (and fetched commands) arrive under this worker's own inbox
        # prefix: with per-worker NATS identities, the only subjects it may
        # subscribe to (`flame-engine worker add`).
        options = {"inbox_prefix": f"_INBOX_{self.id}", **options}
        # A first connection that does not retry: a wrong URL or credential is an
        # error now, not a loop of retries.
        try:
            probe = await nats.connect(
                url, allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=5, error_cb=error, **options
            )
        except Exception as e:
            raise ConnectionError(f"cannot connect to NATS at '{url}': {e}") from None
        await probe.close()
        # Then the worker's own, which reconnects for as long as it runs (a NATS restart).
        self.nc = await nats.connect(
            url,
            name=f"flame-sdk {self.id}",
            max_reconnect_attempts=-1,
            error_cb=error,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            **options,
        )
        self.js = _DomainJetStream(self.nc, domain) if domain else self.nc.jetstream()
        for name, subject in ((protocol.COMMAND_STREAM, "flame.cmd.>"), (protocol.REPORT_STREAM, "flame.report.>")):
            try:
                await self.js.stream_info(name)
            except NotFoundError:
                await self.js.add_stream(
                    name=name,
                    subjects=[subject],
                    max_age=7 * 24 * 3600.0,
                    duplicate_window=protocol.DUPLICATE_WINDOW,
                    max_consumers=100_000,
                )
        # The bucket and the object store as the Rust side makes them, so
        # that whichever starts first, the other finds what it would make.
        streams = (
            api.StreamConfig(
                name=f"KV_{protocol.WORKER_BUCKET}",
                subjects=[f"$KV.{protocol.WORKER_BUCKET}.>"],
                max_age=protocol.WORKER_TTL,
                max_msgs_per_subject=1,
                duplicate_window=protocol.WORKER_TTL,
                deny_delete=True,
            ),
            api.StreamConfig(
                name=f"OBJ_{protocol.BLOB_BUCKET}",
                subjects=[f"$O.{protocol.BLOB_BUCKET}.C.>", f"$O.{protocol.BLOB_BUCKET}.M.>"],
                duplicate_window=protocol.DUPLICATE_WINDOW,
            ),
        )
        for config in streams:
            config.discard, config.allow_rollup_hdrs, config.allow_direct = api.DiscardPolicy.NEW, True, True
            try:
                await self.js.stream_info(str(config.name))
            except NotFoundError:
                await self.js.add_stream(config)
        self._kv = await self.js.key_value(protocol.WORKER_BUCKET)
        self.blobs = await Blobs.open(self.js)

    async def register(self) -> None:
        """Puts this worker's entry (its heartbeat) in the registry."""
        await self._kv.put(self.id, protocol.worker_info(self.id, self.roles, self.realm, self.device, self.instance))

    async def _written_by_another(self) -> Optional[Tuple[int, Optional[str]]]:
        """This worker's registration as it stands, if another process wrote
        it: its revision and that process's mark."""
        try:
            # Bounded: a read an older auth.conf refuses goes unanswered until the request's timeout.
            entry = await asyncio.wait_for(self._kv.get(self.id), timeout=2.0)
        except KeyNotFoundError:
            return None
        except Exception as e:  # not readable (an identity from before this check): the check is skipped
            log.debug("cannot read the registration of worker %s to check it is free: %s", self.id, e)
            return None
        registration, mark = protocol.writer(entry.value)
        if not registration or mark == self.instance:
            return None
        return entry.revision or 0, mark

    async def claim_id(self) -> None:
        """Refuses to start (:class:`IdTaken`) while another live process is
        this worker: both would take its commands. A registration another
        process wrote is watched for :data:`protocol.RENEWAL_WAIT`; a live
        holder renews it (it heartbeats every 2 s), a dead one (this worker
        killed and started again) does not, and its id is taken over."""
        before = await self._written_by_another()
        if before is None:
            return
        log.info(
            "another process registered worker %s lately; waiting %.0f s to see whether it is alive",
            self.id,
            protocol.RENEWAL_WAIT,
        )
        await asyncio.sleep(protocol.RENEWAL_WAIT)
        after = await self._written_by_another()
        if after is not None and after[0] > before[0] and after[1] == before[1]:
            raise IdTaken(self.id)

    # ---- the loop ----------------------------------------------------------

    async def run(self, stop: Optional[asyncio.Event] = None) -> None:
        """Registers, then runs commands until ``stop`` is set. Commands in
        flight finish and report before it returns."""
        assert self.js is not None, "connect() first"
        stop = stop or asyncio.Event()
        await self.claim_id()
        await self.register()
        beat = asyncio.create_task(self._heartbeat())
        sub = await self.js.pull_subscribe(
            f"flame.cmd.{self.id}",
            durable=f"worker-{self.id}",
            stream=protocol.COMMAND_STREAM,
            config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=protocol.COMMAND_ACK_WAIT),
        )
        log.info("worker %s ready: roles %s, realm %s", self.id, self.roles, self.realm)
        tasks: "set[asyncio.Task[None]]" = set()
        try:
            while not stop.is_set():
                free = self.concurrency - len(tasks)
                if free <= 0:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await sub.fetch(batch=free, timeout=0.5)
                except (asyncio.TimeoutError, nats.errors.TimeoutError):
                    continue
                for msg in msgs:
                    t = asyncio.create_task(self.handle(msg))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            beat.cancel()
            await sub.unsubscribe()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(protocol.HEARTBEAT)
            await self.renew()

    async def renew(self) -> int:
        """Renews the registration: each try bounded by a heartbeat's time,
        tried again every ``HEARTBEAT_RETRY`` seconds until one lands. Returns
        how many tries failed."""
        failed = 0
        while True:
            try:
                await asyncio.wait_for(self.register(), timeout=protocol.HEARTBEAT)
                if failed:
                    log.info("heartbeat renewed after %d failed tries", failed)
                return failed
            except Exception as e:  # a server failing over, a leaf's link cut: try again soon
                if failed == 0:
                    log.warning("heartbeat failed, trying again every %.1f s: %s", protocol.HEARTBEAT_RETRY, str(e) or type(e).__name__)
                failed += 1
            await asyncio.sleep(protocol.HEARTBEAT_RETRY)

    async def handle(self, msg: Any) -> None:
        """One delivered command: run it (once per id), publish the report,
        then ack. A report that cannot be published is not acked, so the
        command comes again and is answered from memory."""
        try:
            command = Command.decode(msg.data)
        except ProtocolError as e:
            log.warning("dropping a message that is not a command: %s", e)
            await msg.term()
            return
        stored = (msg.headers or {}).get(protocol.COMMAND_BLOB_HEADER)
        if stored is not None:
            try:
                command = await self.stored_command(command, stored)
            except Exception as e:  # not acked: the command comes again
                log.warning("command %s is in the object store as %s and could not be read: %s", command.id, stored, describe(e))
                return
        # While it runs, the server hears every few seconds that it still runs,
        # so that only a worker that died gets its commands again.
        working = asyncio.create_task(self._still_running(msg))
        try:
            report = await self.execute(command)
            # Tried again with backoff for a while: less than the duplicate window,
            # so a publish that was stored but whose acknowledgement was lost is
            # de-duplicated.
            what = f"report for {command.id}"
            try:
                await retrying(what, lambda: self.send_report(report), protocol.REPORT_RETRY_FOR)
            except Exception as e:
                log.warning("%s not sent (the command will come again): %s", what, e)
                return
        finally:
            working.cancel()
        await self.ack(msg)

    async def stored_command(self, head: Command, digest: str) -> Command:
        """The whole command whose head arrived in a message: read from the
        object store (checked against its digest). One that does not decode,
        or is another command, is answered ``failed`` with the reason."""
        data = await self._blobs().get(digest)
        try:
            whole = Command.decode(data)
        except ProtocolError as e:
            return dataclasses.replace(head, body={"kind": "unreadable", "reason": f"the stored command does not decode: {e}"})
        if whole.id != head.id:
            reason = f"the stored command is '{whole.id}', not '{head.id}'"
            return dataclasses.replace(head, body={"kind": "unreadable", "reason": reason})
        return whole

    async def _still_running(self, msg: Any) -> None:
        while True:
            await asyncio.sleep(protocol.COMMAND_PROGRESS)
            try:
                await msg.in_progress()
            except Exception as e:  # the next word, or the redelivery, will do
                log.debug("telling the server a command still runs: %s", e)

    async def ack(self, msg: Any) -> None:
        await msg.ack()

    async def send_report(self, report: Dict[str, Any]) -> None:
        assert self.js is not None
        job = protocol.check_id(report["job_id"], "job id")
        # On this worker's own subject: with per-worker permissions, the subject says who published it.
        await self.js.publish(
            f"flame.report.{job}.{self.id}",
            json.dumps(report).encode(),
            headers={"Nats-Msg-Id": f"{self.id}:{report['command_id']}"},
        )

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.drain()

    # ---- commands ----------------------------------------------------------

    async def execute(self, command: Command) -> Dict[str, Any]:
        """The report for a command: run once per id; a repeat (also one that
        arrives while the first still runs) gets the same report."""
        if command.id in self._done:
            return self._done[command.id]
        if command.id in self._running:
            return await asyncio.shield(self._running[command.id])
        future: "asyncio.Future[Dict[str, Any]]" = asyncio.get_running_loop().create_future()
        self._running[command.id] = future
        try:
            try:
                body = await self.run_command(command)
            except Exception as e:
                log.warning("command %s failed: %s", command.id, describe(e))
                body = protocol.failed(describe(e))
            report = protocol.report(command, self.id, body)
            self.remember(command.id, report)
            future.set_result(report)
            return report
        finally:
            del self._running[command.id]

    def remember(self, command_id: str, report: Dict[str, Any]) -> None:
        self._done[command_id] = report
        while len(self._done) > REMEMBERED:
            self._done.popitem(last=False)

    async def run_command(self, c: Command) -> Dict[str, Any]:
        if c.v != protocol.VERSION:
            raise ProtocolError(f"protocol version {c.v} is not supported (this worker speaks {protocol.VERSION})")
        b = c.body
        handler = {
            "deploy": self._deploy,
            "init_model": self._init_model,
            "train": self._train,
            "evaluate": self._evaluate,
            "aggregate": self._aggregate,
        }.get(c.kind)
        if handler is None:
            if c.kind == "unreadable":
                raise ProtocolError(str(b.get("reason", "the command could not be read")))
            if c.kind == "coordinate":
                raise Unsupported("this Python worker does not coordinate: run a Rust flame-worker as the coordinator")
            raise ProtocolError(
                f"unknown command kind '{c.kind}' (protocol version {protocol.VERSION} knows {', '.join(protocol.KINDS)})"
            )
        try:
            return await handler(c, b)
        except KeyError as e:
            raise ProtocolError(f"command '{c.kind}' has no field {e}") from None

    async def _deploy(self, c: Command, b: Dict[str, Any]) -> Dict[str, Any]:
        role, dataset = b["role"], b.get("dataset")
        if not protocol.offers(self.roles, role, dataset is not None):
            raise Unsupported(f"this worker offers roles {self.roles}, not '{role}'")
        body: Dict[str, Any] = {"kind": "deployed"}
        if dataset is not None:
            rows = (await self.trainer_for(dataset)).size()
            if rows is not None:
                body["samples"] = int(rows)
        return body

    async def _init_model(self, c: Command, b: Dict[str, Any]) -> Dict[str, Any]:
        model = b["model"]
        if model.get("name") == "external":
            # The job's initial weights, a file the engine stored under its sha256.
            data = await self._blobs().get(model["sha256"])
            start = weights.decode(data)
        elif model.get("name") == "torchscript":
            raise Unsupported("a TorchScript job's initial model comes from its module: run a Rust flame-worker as its aggregator")
        else:
            trainer = await self.trainer_for(b["dataset"])
            made = await self._call(trainer.initialize)
            start = weights.conform(Model({k: np.asarray(v) for k, v in made.items()}), made, "initialize()")
        return {"kind": "initialized", "digest": await self._blobs().put(weights.encode(start))}

    async def _train(self, c: Command, b: Dict[str, Any]) -> Dict[str, Any]:
        objective = (b.get("objective") or {}).get("kind", "plain")
        if objective not in ("plain", "proximal"):
            raise Unsupported(f"this Python trainer does not implement the '{objective}' objective (plain and proximal only)")
        global_model = weights.decode(await self._blobs().get(b["global_model"]))
        trainer = await self.trainer_for(b["dataset"])
        hp = Hyperparameters.from_command(b, seed=int(b.get("seed", 0)), round=c.round)
        result = await self._call(trainer.train, copy.deepcopy(global_model.tensors), hp)
        if not (isinstance(result, tuple) and len(result) == 3):
            raise WeightsError(f"{type(trainer).__name__}.train returned {type(result).__name__}; return (weights, samples, metrics)")
        new, samples, metrics = result
        if not isinstance(new, dict):
            raise WeightsError(f"{type(trainer).__name__}.train returned weights as {type(new).__name__}; return a dict of arrays")
        trained = weights.conform(global_model, new, f"{type(trainer).__name__}.train")
        if int(samples) < 1:
            raise ValueError(f"{type(trainer).__name__}.train reported {samples} samples; an update needs at least 1")
        metrics = _metrics(metrics)
        privacy = (b.get("training") or {}).get("privacy")
        if privacy:
            trained, applied = _privatize(global_model, trained, float(privacy["clip_threshold"]), float(privacy["noise_factor"]), hp.seed)
            metrics.update(applied)
        digest = await self._blobs().put(weights.encode(trained))
        return {"kind": "trained", "digest": digest, "samples": int(samples), "metrics": metrics}

    async def _evaluate(self, c: Command, b: Dict[str, Any]) -> Dict[str, Any]:
        model = weights.decode(await self._blobs().get(b["global_model"]))
        trainer = await self.trainer_for(b["dataset"])
        return {"kind": "evaluated", "metrics": _metrics(await self._call(trainer.evaluate, model.tensors))}

    async def _aggregate(self, c: Command, b: Dict[str, Any]) -> Dict[str, Any]:
        blobs = self._blobs()
        global_model = weights.decode(await blobs.get(b["global_model"]))
        updates: List[Update] = []
        excluded: List[Dict[str, Any]] = []
        for u in b["updates"]:
            try:
                m = weights.decode(await blobs.get(u["digest"]))
                problem = _layout(global_model, m)
                if problem:
                    raise WeightsError(problem)
                updates.append(Update(u["task_id"], u["digest"], m.tensors, int(u["samples"]), int(u.get("staleness", 0))))
            except (BlobError, WeightsError) as e:
                log.warning("update of %s left out: %s", u.get("task_id"), e)
                excluded.append({"task_id": u["task_id"], "digest": u["digest"], "reason": str(e)})
        if not updates:
            raise ValueError(f"no usable update among {len(b['updates'])}: {[x['reason'] for x in excluded]}")
        state = None
        if b.get("optimizer_state"):
            state = weights.decode(await blobs.get(b["optimizer_state"])).tensors
        new, new_state = await self._call(self._aggregator.aggregate, global_model.tensors, updates, b["optimizer"], state)
        result = weights.conform(global_model, new, f"{type(self._aggregator).__name__}.aggregate")
        metrics: Metrics = {}
        if b.get("eval_dataset") and self._make_trainer is not None and b["model"].get("name") != "torchscript":
            try:
                trainer = await self.trainer_for(b["eval_dataset"])
            except Refused as e:
                # An evaluation set this worker may not read: no central evaluation.
                log.warning("no central evaluation: %s", e)
                trainer = None
            try:
                metrics = _metrics(await self._call(trainer.evaluate, result.tensors)) if trainer else {}
            except Unsupported:
                metrics = {}
        body: Dict[str, Any] = {"kind": "aggregated", "digest": await blobs.put(weights.encode(result)), "metrics": metrics}
        if new_state:
            body["optimizer_state"] = await blobs.put(weights.encode(Model(dict(new_state))))
        if excluded:
            body["excluded"] = excluded
        return body

    # ---- helpers -----------------------------------------------------------

    def _blobs(self) -> Blobs:
        assert self.blobs is not None, "connect() first"
        return self.blobs

    async def trainer_for(self, dataset: str) -> Trainer:
        """This worker's trainer for a dataset: made and loaded once."""
        async with self._trainer_lock:
            if dataset not in self._trainers:
                if self._make_trainer is None:
                    raise Unsupported(f"worker '{self.id}' has no trainer for dataset {dataset}")
                url = self.data_roots.resolve(dataset)
                trainer = self._make_trainer()
                await self._call(trainer.load_data, url)
                self._trainers[dataset] = trainer
            return self._trainers[dataset]

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """User code runs in a thread, so heartbeats go on while it trains."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _metrics(m: Any) -> Metrics:
    if m is None:
        return {}
    if not isinstance(m, dict):
        raise ValueError(f"metrics must be a dict of numbers, not {type(m).__name__}")
    out: Metrics = {}
    for k, v in m.items():
        x = float(v)
        if not np.isfinite(x):
            raise ValueError(f"metric '{k}' is {x}; report finite numbers")
        out[str(k)] = x
    return out


def _layout(like: Model, m: Model) -> Optional[str]:
    """Why an update cannot be combined with the global model, or None."""
    if set(like.tensors) != set(m.tensors):
        missing = sorted(set(like.tensors) - set(m.tensors))
        extra = sorted(set(m.tensors) - set(like.tensors))
        return f"other tensors than the global model's: missing {missing}, unexpected {extra}"
    for k, t in like.tensors.items():
        if m.tensors[k].shape != t.shape or m.tensors[k].dtype != t.dtype:
            return f"tensor '{k}' is {m.tensors[k].dtype}{list(m.tensors[k].shape)}; the global model's is {t.dtype}{list(t.shape)}"
    return None


def _privatize(global_model: Model, trained: Model, clip: float, noise: float, seed: int) -> Tuple[Model, Metrics]:
    """Differential privacy on the parameters' update (buffers travel as
    they are): clip ``trained - global`` to L2 norm ``clip``, add Gaussian
    noise of std ``noise * clip``."""
    if not clip > 0 or not noise >= 0:
        raise ValueError(f"privacy needs clip_threshold > 0 and noise_factor >= 0, not {clip} and {noise}")
    names = weights.parameters(global_model)
    deltas = {k: trained.tensors[k].astype(np.float64) - global_model.tensors[k] for k in names}
    norm = float(np.sqrt(sum(float((d * d).sum()) for d in deltas.values())))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    sigma = noise * clip
    rng = np.random.default_rng(seed ^ 0x5EEDD1FFE4E71A11)
    out = dict(trained.tensors)
    for k in names:
        d = deltas[k] * scale + (rng.normal(0.0, sigma, deltas[k].shape) if sigma > 0 else 0.0)
        out[k] = (global_model.tensors[k] + d).astype(np.float32)
    return Model(out, list(trained.buffers)), {"dp_update_norm": norm, "dp_clip_scale": scale, "dp_noise_std": sigma}
