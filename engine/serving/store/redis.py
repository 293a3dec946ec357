"""The job store in Redis, for several server processes sharing one queue.

Every transition is one Lua script, so it is atomic across servers: ``claim`` takes only QUEUED
jobs (two servers never run the same job), ``complete`` only finishes a RUNNING job of the given
attempt. Keys, under the URL's prefix + ``jobs:`` (default ``engine:jobs:``):

- ``job:<id>``: a hash with the job (params, result and error as JSON, like the SQLite columns);
- ``queued`` (all lanes), ``lane:<lane>``, ``key:<lane>:<batch key>``, scored by the queue ``seq``:
  positions are a ZRANK and the queue's head a ZRANGE, O(log n) with 10,000 jobs queued;
- per owner (API key), for fair turns across every server: ``owners:<lane>`` (a hash: owner ->
  queued jobs, the ring of keys with work), ``own:<lane>:<owner>`` and
  ``ownkey:<lane>:<batch key>:<owner>`` (scored by ``seq``); ``queued`` reads each owner's head
  in one script, and ``claim`` takes whatever the policy chose atomically;
- ``created``: queued jobs by submission time (job_timeout_s);
- ``running``: running jobs by lease deadline; ``done:<status>``: finished jobs by finish time.

Running jobs hold a lease (``lease_s``, renewed by a thread of this store for the jobs it claimed).
A server that dies stops renewing, and any server puts its jobs back in the queue once the lease
has run out. So unlike SQLite (one process per file, which requeues everything it finds running at
start), ``requeue_running`` only takes expired leases: a restarted server picks its own earlier
jobs up within ``lease_s``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

from engine.errors import InvalidRequest, NotReady
from engine.runtime.params import DecodingParams
from engine.serving.batching import Lane, QueueEntry, batch_key_text
from engine.serving.jobs import Job, JobError, JobResult, JobStatus
from engine.serving.store.base import (
    PURGE_BATCH,
    JobStore,
    LimitReached,
    QueueLoad,
    Replay,
    StoreHealth,
    Submission,
    decode_error,
    decode_result,
    encode_error,
    encode_result,
    queue_entry,
    store_call,
)
from engine.serving.store.url import StoreUrl, parse_store_url

log = logging.getLogger(__name__)


# Shared Lua helpers: take a job out of the queue's sets / put it back at its place.
_LUA_HELPERS = """
local P = ARGV[1]
-- Lease times are Redis's clock, not the servers': a server whose clock steps neither steals
-- another's jobs nor keeps its own past their lease.
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function queue_fields(id)
  return redis.call('HMGET', P..'job:'..id, 'seq', 'lane', 'batch_key', 'created_at', 'owner', 'prompt_tokens')
end
-- 'load' holds the queued prompt tokens ('tokens') and per owner 'jobs:<owner>', 'tokens:<owner>'.
local function add_load(owner, jobs, tokens)
  local L = P..'load'
  redis.call('HINCRBY', L, 'tokens', tokens)
  if redis.call('HINCRBY', L, 'jobs:'..owner, jobs) <= 0 then
    redis.call('HDEL', L, 'jobs:'..owner, 'tokens:'..owner)
  else
    redis.call('HINCRBY', L, 'tokens:'..owner, tokens)
  end
end
local function unqueue(id)
  local f = queue_fields(id)
  local lane, key, owner = f[2], f[3], f[5]
  redis.call('ZREM', P..'queued', id)
  redis.call('ZREM', P..'lane:'..lane, id)
  redis.call('ZREM', P..'key:'..lane..':'..key, id)
  redis.call('ZREM', P..'created', id)
  redis.call('ZREM', P..'own:'..lane..':'..owner, id)
  redis.call('ZREM', P..'ownkey:'..lane..':'..key..':'..owner, id)
  if redis.call('HINCRBY', P..'owners:'..lane, owner, -1) <= 0 then
    redis.call('HDEL', P..'owners:'..lane, owner)
  end
  add_load(owner, -1, -tonumber(f[6]))
end
local function queue(id)
  local f = queue_fields(id)
  local seq, lane, key, owner = f[1], f[2], f[3], f[5]
  redis.call('ZADD', P..'queued', seq, id)
  redis.call('ZADD', P..'lane:'..lane, seq, id)
  redis.call('ZADD', P..'key:'..lane..':'..key, seq, id)
  redis.call('ZADD', P..'created', f[4], id)
  redis.call('ZADD', P..'own:'..lane..':'..owner, seq, id)
  redis.call('ZADD', P..'ownkey:'..lane..':'..key..':'..owner, seq, id)
  redis.call('HINCRBY', P..'owners:'..lane, owner, 1)
  add_load(owner, 1, tonumber(f[6]))
end
local function requeue(id)
  local j = P..'job:'..id
  redis.call('HSET', j, 'status', 'queued')
  redis.call('HDEL', j, 'started_at')
  redis.call('ZREM', P..'running', id)
  queue(id)
end
"""

# ARGV: prefix, id, idempotency key name or '', the four QueueLimits (or four ''), owner, prompt
# tokens, then field/value pairs of the job hash (lane, batch_key, created_at among them).
# Returns {seq}; {-1, earlier id} for a replay: the key names a job the store still holds (the
# name is deleted with that job by the purge); {-2, limit, queued load...} past a limit (the
# same order of checks as QueueLimits.passed).
_ENQUEUE = """
local id, idem = ARGV[2], ARGV[3]
local j = P..'job:'..id
if redis.call('EXISTS', j) == 1 then return redis.error_reply('job id exists') end
if idem ~= '' then
  local earlier = redis.call('GET', idem)
  if earlier and redis.call('EXISTS', P..'job:'..earlier) == 1 then return {-1, earlier} end
end
if ARGV[4] ~= '' then
  local owner, tokens = ARGV[8], tonumber(ARGV[9])
  local l = redis.call('HMGET', P..'load', 'tokens', 'jobs:'..owner, 'tokens:'..owner)
  local load = {redis.call('ZCARD', P..'queued'), tonumber(l[1] or '0'), tonumber(l[2] or '0'),
    tonumber(l[3] or '0')}
  local passed = nil
  if load[1] >= tonumber(ARGV[4]) then passed = 'max_queue_size'
  elseif load[2] + tokens > tonumber(ARGV[5]) then passed = 'max_queued_tokens'
  elseif load[3] >= tonumber(ARGV[6]) then passed = 'max_queued_jobs_per_key'
  elseif load[4] + tokens > tonumber(ARGV[7]) then passed = 'max_queued_tokens_per_key' end
  if passed then return {-2, passed, load[1], load[2], load[3], load[4]} end
end
if idem ~= '' then redis.call('SET', idem, id) end
local seq = redis.call('INCR', P..'seq')
local fields = {}
for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', j, 'seq', seq, unpack(fields))
if idem ~= '' then redis.call('HSET', j, 'idem', idem) end
queue(id)
return {seq}
"""

# ARGV: prefix, now, lease_s, ids...
_CLAIM = """
local claimed = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local j = P..'job:'..id
  if redis.call('HGET', j, 'status') == 'queued' then
    unqueue(id)
    redis.call('HSET', j, 'status', 'running', 'started_at', ARGV[2])
    redis.call('HINCRBY', j, 'attempts', 1)
    redis.call('ZADD', P..'running', server_now() + tonumber(ARGV[3]), id)
    claimed[#claimed + 1] = id
  end
end
return claimed
"""

# ARGV: prefix, id, attempt, now, field, value: RUNNING of this attempt -> COMPLETED or FAILED
_FINISH_RUNNING = """
local id = ARGV[2]
local j = P..'job:'..id
local f = redis.call('HMGET', j, 'status', 'attempts')
if f[1] ~= 'running' or f[2] ~= ARGV[3] then return 0 end
local status = ARGV[5] == 'result' and 'completed' or 'failed'
redis.call('HSET', j, 'status', status, 'finished_at', ARGV[4], ARGV[5], ARGV[6])
-- An audit count of results written: 1 for every job, however many servers ran it (the soak
-- benchmark checks it after kill -9s).
redis.call('HINCRBY', j, 'ends', 1)
redis.call('ZREM', P..'running', id)
redis.call('ZADD', P..'done:'..status, ARGV[4], id)
return 1
"""

# ARGV: prefix, id, now, error: QUEUED -> FAILED
_FAIL_QUEUED = """
local id = ARGV[2]
local j = P..'job:'..id
if redis.call('HGET', j, 'status') ~= 'queued' then return 0 end
unqueue(id)
redis.call('HSET', j, 'status', 'failed', 'finished_at', ARGV[3], 'error', ARGV[4])
redis.call('ZADD', P..'done:failed', ARGV[3], id)
return 1
"""

# ARGV: prefix, id, now: QUEUED or RUNNING -> CANCELLED
_CANCEL = """
local id = ARGV[2]
local j = P..'job:'..id
local status = redis.call('HGET', j, 'status')
if status == 'queued' then
  unqueue(id)
elseif status == 'running' then
  redis.call('ZREM', P..'running', id)
else
  return 0
end
redis.call('HSET', j, 'status', 'cancelled', 'finished_at', ARGV[3])
redis.call('ZADD', P..'done:cancelled', ARGV[3], id)
return 1
"""

# ARGV: prefix, id, attempt: RUNNING of this attempt -> QUEUED at its old place
_REQUEUE = """
local j = P..'job:'..ARGV[2]
local f = redis.call('HMGET', j, 'status', 'attempts')
if f[1] ~= 'running' or f[2] ~= ARGV[3] then return 0 end
requeue(ARGV[2])
return 1
"""

# ARGV: prefix: every running job whose lease ran out -> QUEUED
_REQUEUE_EXPIRED = """
local ids = redis.call('ZRANGEBYSCORE', P..'running', '-inf', server_now())
local out = {}
for _, id in ipairs(ids) do
  if redis.call('HGET', P..'job:'..id, 'status') == 'running' then
    requeue(id)
    out[#out + 1] = id
  else
    redis.call('ZREM', P..'running', id)
  end
end
return out
"""

# ARGV: prefix, lane, limit, batch key or '': the oldest per_owner(limit, owners) queued jobs of
# each owner with work in the lane, as flat lists of the QueueEntry fields (one round trip, one
# consistent view)
_QUEUED = """
local lane, limit, key = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local out = {}
local owners = redis.call('HKEYS', P..'owners:'..lane)
-- store.base.per_owner: fewer of each when many keys have work, at least each one's head
limit = math.max(1, math.min(limit, math.floor(4 * limit / math.max(1, #owners))))
for _, owner in ipairs(owners) do
  local set = key == '' and P..'own:'..lane..':'..owner or P..'ownkey:'..lane..':'..key..':'..owner
  for _, id in ipairs(redis.call('ZRANGE', set, 0, limit - 1)) do
    local f = redis.call('HMGET', P..'job:'..id, 'seq', 'created_at', 'lane', 'batch_key',
      'num_prompts', 'prompt_tokens', 'max_new_tokens', 'owner')
    if f[1] then out[#out + 1] = {id, f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8]} end
  end
end
return out
"""

# ARGV: prefix, lease_s, ids...: extend the leases of jobs still running
_RENEW = """
local deadline = server_now() + tonumber(ARGV[2])
for i = 3, #ARGV do redis.call('ZADD', P..'running', 'XX', deadline, ARGV[i]) end
return 1
"""

# ARGV: prefix, cutoff: delete finished jobs older than cutoff
_PURGE = """
local n = 0
local limit = tonumber(ARGV[3])
for _, status in ipairs({'completed', 'failed', 'cancelled'}) do
  if n >= limit then break end
  local set = P..'done:'..status
  local ids = redis.call('ZRANGEBYSCORE', set, '-inf', '('..ARGV[2], 'LIMIT', 0, limit - n)
  for _, id in ipairs(ids) do
    local idem = redis.call('HGET', P..'job:'..id, 'idem')
    if idem and redis.call('GET', idem) == id then redis.call('DEL', idem) end
    redis.call('DEL', P..'job:'..id)
    redis.call('ZREM', set, id)
    n = n + 1
  end
end
return n
"""


def connect(url: StoreUrl) -> Any:
    """A Redis client for a store URL: every call bounded by the URL's timeouts, and at most one
    immediate retry on a fresh connection after a connection error (a connection from before a
    Redis restart fails once), none after a timeout (a paused Redis would hold the caller twice as
    long), instead of redis-py's default of ten retries with backoff, which held the event loop
    for seconds during an outage."""
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.retry import Retry
    except ImportError as exc:  # pragma: no cover - redis is a dependency of the dev extra
        raise InvalidRequest(
            "a redis:// store needs the redis client: pip install 'flan-t5-engine[redis]'"
        ) from exc
    return redis.Redis.from_url(
        url.client_url,
        decode_responses=True,
        socket_timeout=url.timeout_s,
        socket_connect_timeout=url.connect_timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_timeout=False,
        health_check_interval=0,
    )


def redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError)


class RedisJobStore(JobStore):
    shared = True  # every server of a fleet runs on one Redis

    def __init__(
        self, url: str | StoreUrl, *, prefix: str | None = None, lease_s: float | None = None
    ) -> None:
        self.url = parse_store_url(url)
        self.prefix = self.url.jobs_prefix if prefix is None else prefix
        self.lease_s = self.url.lease_s if lease_s is None else lease_s
        self.errors = redis_errors()
        self._r: Any = connect(self.url)
        self.health = StoreHealth(self.url.redacted, self._r.ping)
        try:
            self._r.ping()
        except self.errors as exc:
            raise NotReady(
                f"cannot reach the Redis job store at {self.url} ({type(exc).__name__}); is Redis running?"
            ) from exc
        self._scripts = {
            name: self._r.register_script(_LUA_HELPERS + body)
            for name, body in (
                ("enqueue", _ENQUEUE),
                ("claim", _CLAIM),
                ("queued", _QUEUED),
                ("finish", _FINISH_RUNNING),
                ("fail_queued", _FAIL_QUEUED),
                ("cancel", _CANCEL),
                ("requeue", _REQUEUE),
                ("requeue_expired", _REQUEUE_EXPIRED),
                ("renew", _RENEW),
                ("purge", _PURGE),
            )
        }
        self._mine: set[str] = set()  # jobs this store claimed and still runs: their leases renew
        self._mine_lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._leases = threading.Thread(target=self._lease_loop, name="redis-leases", daemon=True)
        self._leases.start()
        self.health.start()

    def _run(self, name: str, *args: Any) -> Any:
        return self._scripts[name](keys=[], args=[self.prefix, *args])

    def _k(self, name: str) -> str:
        return self.prefix + name

    # -- leases --------------------------------------------------------------------------------
    def _lease_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                with self._mine_lock:
                    mine = list(self._mine)
                if mine:
                    self._run("renew", self.lease_s, *mine)
                requeued = self._run("requeue_expired")
                if requeued:
                    log.warning("requeued %d job(s) whose server stopped renewing its lease", len(requeued))
            except self.errors as exc:
                self.health.failed(exc)

    def _release(self, job_id: str) -> None:
        with self._mine_lock:
            self._mine.discard(job_id)

    # -- interface -----------------------------------------------------------------------------
    @store_call
    def enqueue(self, submission: Submission) -> QueueEntry:
        job, prompt_tokens, limits = submission.job, submission.prompt_tokens, submission.limits
        key = batch_key_text(job.params)
        fields: dict[str, Any] = {
            "owner": job.owner,
            "prompts": json.dumps(list(job.prompts)),
            "params": json.dumps(job.params.to_dict()),
            "status": JobStatus.QUEUED.value,
            "lane": submission.lane.value,
            "batch_key": key,
            "num_prompts": len(job.prompts),
            "prompt_tokens": prompt_tokens,
            "max_new_tokens": job.params.max_new_tokens,
            "created_at": repr(job.created_at),
            "attempts": job.attempts,
        }
        if job.model is not None:
            fields["model"] = job.model
        flat = [x for kv in fields.items() for x in kv]
        idem = (
            ""
            if submission.idempotency_key is None
            else self._idempotency_name(job.owner, submission.idempotency_key)
        )
        bounds: list[Any] = (
            ["", "", "", ""]
            if limits is None
            else [
                limits.max_queue_size,
                limits.max_queued_tokens,
                limits.max_queued_jobs_per_key,
                limits.max_queued_tokens_per_key,
            ]
        )
        reply = self._run("enqueue", job.id, idem, *bounds, job.owner, prompt_tokens, *flat)
        if int(reply[0]) == -1:
            raise Replay(reply[1])
        if int(reply[0]) == -2:
            raise LimitReached(reply[1], QueueLoad(*(int(x) for x in reply[2:6])))
        return queue_entry(submission, int(reply[0]), key)

    def _idempotency_name(self, owner: str, idempotency_key: str) -> str:
        # The owner's length first: owners and keys may hold ':' without two pairs meeting.
        return self._k(f"idem:{len(owner)}:{owner}:{idempotency_key}")

    @store_call
    def find_idempotent(self, owner: str, idempotency_key: str) -> str | None:
        earlier = self._r.get(self._idempotency_name(owner, idempotency_key))
        if earlier is None or not self._r.exists(self._k(f"job:{earlier}")):
            return None
        return str(earlier)

    @store_call
    def get(self, job_id: str) -> Job | None:
        data = self._r.hgetall(self._k(f"job:{job_id}"))
        return _job(job_id, data) if data else None

    @store_call
    def position(self, job_id: str) -> int:
        rank = self._r.zrank(self._k("queued"), job_id)
        return 0 if rank is None else int(rank)

    @store_call
    def queue_depth(self) -> int:
        return int(self._r.zcard(self._k("queued")))

    @store_call
    def load(self, owner: str) -> QueueLoad:
        pipe = self._r.pipeline(transaction=True)
        pipe.zcard(self._k("queued"))
        pipe.hmget(self._k("load"), "tokens", f"jobs:{owner}", f"tokens:{owner}")
        jobs, (tokens, owner_jobs, owner_tokens) = pipe.execute()
        return QueueLoad(int(jobs), int(tokens or 0), int(owner_jobs or 0), int(owner_tokens or 0))

    @store_call
    def still_queued(self, job_ids: Sequence[str]) -> set[str]:
        if not job_ids:
            return set()
        scores = self._r.zmscore(self._k("queued"), list(job_ids))
        return {job_id for job_id, score in zip(job_ids, scores, strict=True) if score is not None}

    @store_call
    def statuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        if not job_ids:
            return {}
        pipe = self._r.pipeline(transaction=False)  # one round trip: an HGET of status per job
        for job_id in job_ids:
            pipe.hget(self._k(f"job:{job_id}"), "status")
        statuses = pipe.execute()
        return {
            job_id: JobStatus(status)
            for job_id, status in zip(job_ids, statuses, strict=True)
            if status is not None
        }

    @store_call
    def count(self, status: JobStatus) -> int:
        if status is JobStatus.QUEUED:
            return self.queue_depth()
        if status is JobStatus.RUNNING:
            return int(self._r.zcard(self._k("running")))
        return int(self._r.zcard(self._k(f"done:{status.value}")))

    @store_call
    def queued(self, lane: Lane, limit: int, batch_key: str | None = None) -> list[QueueEntry]:
        rows = self._run("queued", lane.value, limit, batch_key or "")
        out = [
            QueueEntry(r[0], int(r[1]), float(r[2]), Lane(r[3]), r[4], int(r[5]), int(r[6]), int(r[7]), r[8])
            for r in rows
        ]
        out.sort(key=lambda e: e.seq)
        return out

    @store_call
    def claim(self, job_ids: Sequence[str], now: float) -> list[Job]:
        if not job_ids:
            return []
        claimed = self._run("claim", repr(now), self.lease_s, *job_ids)
        if not claimed:
            return []
        pipe = self._r.pipeline(transaction=False)
        for job_id in claimed:
            pipe.hgetall(self._k(f"job:{job_id}"))
        # Should this second round trip fail, the jobs are RUNNING under a lease that nobody
        # renews: they go back to the queue once it runs out (lease_s), run by whichever server.
        jobs = [(int(d["seq"]), _job(i, d)) for i, d in zip(claimed, pipe.execute(), strict=True) if d]
        with self._mine_lock:
            self._mine.update(job.id for _, job in jobs)
        return [job for _, job in sorted(jobs, key=lambda sj: sj[0])]

    @store_call
    def complete(self, job_id: str, attempt: int, result: JobResult, now: float) -> bool:
        self._release(job_id)
        return bool(self._run("finish", job_id, attempt, repr(now), "result", encode_result(result)))

    @store_call
    def fail(self, job_id: str, attempt: int | None, error: JobError, now: float) -> bool:
        if attempt is None:
            return bool(self._run("fail_queued", job_id, repr(now), encode_error(error)))
        self._release(job_id)
        return bool(self._run("finish", job_id, attempt, repr(now), "error", encode_error(error)))

    @store_call
    def cancel(self, job_id: str, now: float) -> Job | None:
        self._run("cancel", job_id, repr(now))
        self._release(job_id)
        return self.get(job_id)

    @store_call
    def requeue(self, job_id: str, attempt: int) -> bool:
        self._release(job_id)
        return bool(self._run("requeue", job_id, attempt))

    def reconcile(self, running_here: set[str]) -> list[str]:
        """Leases renew only for the jobs that this server's loops run: a job whose end could not
        be written (the store failed) stops being renewed and goes back to the queue once its
        lease runs out, found from the store by whichever server looks first."""
        with self._mine_lock:
            dropped = self._mine - running_here
            self._mine &= running_here
        return sorted(dropped)

    @store_call
    def requeue_running(self) -> list[str]:
        return list(self._run("requeue_expired"))

    @store_call
    def queued_before(self, cutoff: float, limit: int = 1000) -> list[str]:
        return list(self._r.zrangebyscore(self._k("created"), "-inf", f"({cutoff!r}", start=0, num=limit))

    @store_call
    def purge_expired(self, now: float, ttl_s: float, limit: int = PURGE_BATCH) -> int:
        return int(self._run("purge", repr(now - ttl_s), limit))

    def ping(self) -> bool:
        return not self._closed and self.health.up

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.health.stop()
        if self._leases is not threading.current_thread():
            self._leases.join(timeout=5)
        self._r.close()


def _job(job_id: str, d: dict[str, str]) -> Job:
    def opt_float(name: str) -> float | None:
        return float(d[name]) if name in d else None

    return Job(
        id=job_id,
        owner=d["owner"],
        prompts=tuple(json.loads(d["prompts"])),
        params=DecodingParams(**json.loads(d["params"])),
        status=JobStatus(d["status"]),
        created_at=float(d["created_at"]),
        started_at=opt_float("started_at"),
        finished_at=opt_float("finished_at"),
        attempts=int(d["attempts"]),
        model=d.get("model"),
        result=decode_result(d["result"]) if "result" in d else None,
        error=decode_error(d["error"]) if "error" in d else None,
    )
