"""The ledger in Redis, shared by several stateless discovery front-ends.

Every credit-changing operation is one Lua script, which Redis runs
atomically: no other front-end's command interleaves, so no overdraw, no
double pay, a task settled exactly once, and slots never lost. Worker
leases live in a sorted set scored by lease expiry, open tasks in another
scored by task expiry; every script first refunds tasks past their expiry.
Workers are drawn inside the assignment script, uniformly among the live
ones with a free slot, by rejection from an index of the free workers
(redis_pool: O(replication x n) keys touched, not the pool), with random
numbers from a seed the front-end passes in (so a draw is reproducible
from the script's arguments).

Keys (under a prefix, "ec262:" by default): `c:<client id>` hash per client,
`pool` (zset client id -> lease expiry), `t:<task id>` hash per open task,
`texp` (zset task id -> expiry), `s:<task id>` hash per settle remembered
for repeats (until the task's expiry: `sexp`, zset task id -> expiry),
`leases` (zset client id -> lease expiry), `ft:<foreman>` (set of its open
task ids, so a foreman whose lease ends loses them),
`r:<foreman>:<request id>` hash per RequestTasks remembered for repeats
(`rexp`, zset -> expiry), `m:<task id>` (worker -> commitment, open tasks),
`l:<task id>` hash per settled task with late workers (`lexp`, zset ->
the end of its late window), `issued` (credits handed out, for audits),
and the pool's indexes `free`, `trust`, `trust:<runtime>`, `pool_index`
(redis_pool).
Standalone Redis only: the scripts touch keys they compute, which a Redis
Cluster would refuse.
"""

from __future__ import annotations

import functools
import logging
import random
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from discovery_service.redis_pool import DRAW, POOL
from discovery_service.store import (
    IDENTITY,
    LIVE_COUNT_CAP,
    MAX_SLOTS_PER_REQUEST,
    MAX_WORKERS_PER_REPLICA,
    NETWORK,
    Assignment,
    ChooseWorkers,
    ClientRecord,
    LedgerStore,
    LedgerTotals,
    NewClientLimit,
    NewTask,
    ReplicaRequest,
    Settlement,
    TaskRequest,
    WorkerRef,
    assignments_from_text,
    insufficient_credits,
    no_committed_quorum,
    not_assigned,
    request_mismatch,
    settle_conflict,
    trusted_enough,
)
from ec262.errors import InsufficientCredits, InvalidRequest, ServiceUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

_EXPIRE = (
    POOL
    + """
local function close_open(prefix, tid)
  local t = prefix .. 't:' .. tid
  local f = redis.call('HMGET', t, 'foreman_id', 'escrow', 'workers')
  if f[1] then
    redis.call('HINCRBY', prefix .. 'c:' .. f[1], 'credits', tonumber(f[2]))
    for w in string.gmatch(f[3], '%S+') do busy(prefix, w, -1) end
    redis.call('DEL', t)
    redis.call('SREM', prefix .. 'ft:' .. f[1], tid)
  end
  redis.call('DEL', prefix .. 'm:' .. tid)
  redis.call('ZREM', prefix .. 'texp', tid)
  return f[1] and 1 or 0
end
local function expire(prefix, now)
  local due = redis.call('ZRANGEBYSCORE', prefix .. 'texp', '-inf', now)
  local closed = 0
  for _, tid in ipairs(due) do closed = closed + close_open(prefix, tid) end
  local gone = redis.call('ZRANGEBYSCORE', prefix .. 'leases', '-inf', now)
  for _, foreman in ipairs(gone) do
    for _, tid in ipairs(redis.call('SMEMBERS', prefix .. 'ft:' .. foreman)) do
      closed = closed + close_open(prefix, tid)
    end
    redis.call('DEL', prefix .. 'ft:' .. foreman)
    redis.call('ZREM', prefix .. 'leases', foreman)
  end
  local remembered = redis.call('ZRANGEBYSCORE', prefix .. 'sexp', '-inf', now)
  for _, tid in ipairs(remembered) do
    redis.call('DEL', prefix .. 's:' .. tid)
    redis.call('ZREM', prefix .. 'sexp', tid)
  end
  -- Late workers whose window ended without a commitment: failed, refunded.
  for _, tid in ipairs(redis.call('ZRANGEBYSCORE', prefix .. 'lexp', '-inf', now)) do
    local l = prefix .. 'l:' .. tid
    local fields, silent = redis.call('HGETALL', l), 0
    for i = 1, #fields, 2 do
      if string.sub(fields[i], 1, 2) == 'w:' and fields[i + 1] == '' then
        local w = string.sub(fields[i], 3)
        redis.call('HINCRBY', prefix .. 'c:' .. w, 'tasks_failed', 1)
        busy(prefix, w, -1)
        silent = silent + 1
      end
    end
    local foreman = redis.call('HGET', l, 'foreman_id')
    if foreman and silent > 0 then
      redis.call('HINCRBY', prefix .. 'c:' .. foreman, 'credits', silent)
    end
    redis.call('DEL', l)
    redis.call('ZREM', prefix .. 'lexp', tid)
  end
  local requests = redis.call('ZRANGEBYSCORE', prefix .. 'rexp', '-inf', now)
  for _, rid in ipairs(requests) do
    redis.call('DEL', prefix .. 'r:' .. rid)
    redis.call('ZREM', prefix .. 'rexp', rid)
  end
  return closed
end
"""
)

# ARGV: prefix, id, secret hash, credits, now, then (or '') the origin's
# network, limit and window: a sorted set per network of when it made each.
_CREATE = """
local c = ARGV[1] .. 'c:' .. ARGV[2]
if redis.call('EXISTS', c) == 1 then return 0 end
if ARGV[6] ~= '' then
  local o = ARGV[1] .. 'o:' .. ARGV[6]
  redis.call('ZREMRANGEBYSCORE', o, '-inf', tonumber(ARGV[5]) - tonumber(ARGV[8]))
  if redis.call('ZCARD', o) >= tonumber(ARGV[7]) then
    return {-1, redis.call('ZRANGE', o, 0, 0, 'WITHSCORES')[2]}
  end
  redis.call('ZADD', o, ARGV[5], ARGV[2])
  redis.call('EXPIRE', o, math.ceil(tonumber(ARGV[8])))
end
redis.call('HSET', c, 'secret_hash', ARGV[3], 'credits', ARGV[4], 'starting_credits', ARGV[4],
  'address', '', 'runtime', '', 'expiry_unix', '0', 'slots', 0, 'busy_slots', 0,
  'tasks_completed', 0, 'tasks_failed', 0, 'created_unix', ARGV[5])
redis.call('INCRBY', ARGV[1] .. 'issued', ARGV[4])
return 1
"""

_GET = (
    _EXPIRE
    + """
expire(ARGV[1], ARGV[3])
return redis.call('HGETALL', ARGV[1] .. 'c:' .. ARGV[2])
"""
)

_REGISTER = (
    _EXPIRE
    + """
local prefix, id, now = ARGV[1], ARGV[2], ARGV[3]
expire(prefix, now)
local c = prefix .. 'c:' .. id
if redis.call('EXISTS', c) == 0 then return {} end
if ARGV[4] == 'leave' then
  redis.call('HSET', c, 'expiry_unix', '0')
  unpool(prefix, id)
else
  local old_runtime = redis.call('HGET', c, 'runtime')
  redis.call('HSET', c, 'address', ARGV[5], 'slots', ARGV[6], 'runtime', ARGV[7],
    'expiry_unix', ARGV[8], 'tls_certificate', ARGV[9], 'network', ARGV[10])
  join_pool(prefix, id, ARGV[8], old_runtime)
end
return redis.call('HGETALL', c)
"""
)

# ARGV: prefix, foreman, n, replication, now, task expiry, runtime, exclude
# (sorted, space-separated), request id ('' for none), the spread mode
# (--diversity), the most slots of one worker a request takes,
# --trusted-after (0: no trust rule), adaptive replication's spot checks
# ('' when not adaptive, else one '0' or '1' per task), the most trusted
# workers the rule need count (store.trusted_enough), a seed for the draw's
# random numbers, then n (task id, key) pairs. The draws are
# draws.draw_groups's, step for step (redis_pool.DRAW), under the rules of
# store.TaskRequest.rules. A request id seen before returns what that
# request made (store.assignments_text).
_ASSIGN = (
    _EXPIRE
    + DRAW
    + """
local prefix, foreman = ARGV[1], ARGV[2]
local n, r, now, texpiry = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
local runtime, exclude, rid = ARGV[7], ARGV[8], ARGV[9]
local spread, cap, ta, spots = ARGV[10], tonumber(ARGV[11]), tonumber(ARGV[12]), ARGV[13]
local enough, seed = tonumber(ARGV[14]), tonumber(ARGV[15])
expire(prefix, now)
local fkey = prefix .. 'c:' .. foreman
local rname = foreman .. ':' .. rid
if rid ~= '' then
  local seen = redis.call('HMGET', prefix .. 'r:' .. rname, 'n', 'exclude', 'reply', 'expiry')
  if seen[1] then
    if seen[1] ~= ARGV[3] or seen[2] ~= exclude then return {'MISMATCH', seen[1], seen[2]} end
    return {'REPEAT', redis.call('HGET', fkey, 'credits'), seen[3], seen[4]}
  end
end
local balance = tonumber(redis.call('HGET', fkey, 'credits'))
ensure_index(prefix)
redis.call('ZREMRANGEBYSCORE', prefix .. 'pool', '-inf', now)
local excluded = {}
for w in string.gmatch(exclude, '%S+') do excluded[w] = true end
local trusted_live = trusted_usable(prefix, tonumber(now), foreman, runtime, excluded, ta, enough)
-- Each task's rule (store.TaskRequest.rules): its size, its cap on untrusted
-- workers (-1: none; store.untrusted_cap, at most r - quorum while a quorum
-- of trusted is live), and whether an untrusted one is drawn first
-- (store.adaptive_rules: 2 trusted workers, a spot check 3).
local q = math.floor(r / 2) + 1
local sizes, caps, firsts, needed = {}, {}, {}, 0
for i = 1, n do
  sizes[i], caps[i], firsts[i] = r, -1, false
  if spots == '' then
    if ta > 0 and trusted_live >= q then caps[i] = r - q end
  elseif trusted_live >= 2 then
    if string.sub(spots, i, i) == '1' then caps[i], firsts[i] = 1, true
    else sizes[i], caps[i] = 2, 0 end
  end
  needed = needed + sizes[i]
end
if balance < needed then return {'INSUFFICIENT', balance, needed} end
local out = {'OK', 0}
local spent = 0
local d = new_draw(prefix, tonumber(now), foreman, runtime, excluded, ta, spread, cap, seed)
local used = {}
for i = 1, n do
  local size = sizes[i]
  local chosen = draw_group(d, size, caps[i], firsts[i], used, {}, 0)
  if not chosen then break end
  local ids, addresses = {}, {}
  for _, c in ipairs(chosen) do
    used[c.id] = (used[c.id] or 0) + 1
    table.insert(ids, c.id); table.insert(addresses, c.address)
  end
  local tid, key = ARGV[16 + 2 * (i - 1)], ARGV[17 + 2 * (i - 1)]
  redis.call('HSET', prefix .. 't:' .. tid, 'foreman_id', foreman, 'key', key, 'escrow', size,
    'expiry_unix', texpiry, 'workers', table.concat(ids, ' '),
    'replication', spots == '' and r or -1)  -- store.task_replication
  redis.call('ZADD', prefix .. 'texp', texpiry, tid)
  redis.call('SADD', prefix .. 'ft:' .. foreman, tid)
  spent = spent + size
  table.insert(out, tid); table.insert(out, table.concat(ids, ' '))
  table.insert(out, table.concat(addresses, ' '))
end
finish_draw(d)
for w, count in pairs(used) do busy(prefix, w, count) end
out[2] = redis.call('HINCRBY', fkey, 'credits', 0 - spent)  -- never "-0"
if rid ~= '' then
  local lines = {}
  for i = 3, #out, 3 do
    table.insert(lines, out[i] .. '\\t' .. out[i + 1] .. '\\t' .. out[i + 2])
  end
  redis.call('HSET', prefix .. 'r:' .. rname, 'n', ARGV[3], 'exclude', exclude,
    'reply', table.concat(lines, '\\n'), 'expiry', texpiry)
  redis.call('ZADD', prefix .. 'rexp', texpiry, rname)
end
return out
"""
)

# ARGV: prefix, foreman, task id, valid ('1' or '0'), now, missing and
# released (each sorted, space-separated; empty for an invalid settle), the
# quorum of identical commitments to look for, the end of the late window.
# Late workers live in `l:<task id>` (foreman_id, quorum, and `w:<worker>`:
# '' until it commits, then its sha) until the window ends (`lexp`).
_SETTLE = (
    _EXPIRE
    + """
local prefix, foreman, tid, valid, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1', ARGV[5]
expire(prefix, now)
local t = prefix .. 't:' .. tid
local h = redis.call('HMGET', t, 'foreman_id', 'key', 'escrow', 'workers', 'expiry_unix',
  'replication')
if not h[1] or h[1] ~= foreman then
  local s = redis.call('HMGET', prefix .. 's:' .. tid, 'foreman_id', 'valid', 'missing', 'key')
  if not s[1] or s[1] ~= foreman then return {'NOTFOUND'} end
  local let_go = redis.call('HGET', prefix .. 's:' .. tid, 'released') or ''
  if s[2] ~= ARGV[4] or s[3] ~= ARGV[6] or let_go ~= ARGV[7] then
    return {'CONFLICT', s[2], s[3]}
  end
  local balance = redis.call('HGET', prefix .. 'c:' .. foreman, 'credits')
  if valid then
    local q = redis.call('HMGET', prefix .. 's:' .. tid, 'quorum', 'agreeing', 'paid', 'late')
    return {'OK', balance, s[4], q[1] or '', q[2] or '', q[3] or '', q[4] or ''}
  end
  return {'OK', balance}
end
local workers, list = {}, {}
for w in string.gmatch(h[4], '%S+') do workers[w] = true; table.insert(list, w) end
local missing, released, strangers = {}, {}, {}
for w in string.gmatch(ARGV[6], '%S+') do
  if workers[w] then missing[w] = true else table.insert(strangers, w) end
end
if #strangers > 0 then return {'STRANGERS', 'missing', table.concat(strangers, ' ')} end
for w in string.gmatch(ARGV[7], '%S+') do
  if workers[w] then released[w] = true else table.insert(strangers, w) end
end
if #strangers > 0 then return {'STRANGERS', 'released', table.concat(strangers, ' ')} end
-- What a quorum of the task's workers committed to (store.committed_quorum),
-- the quorum of the task's own replication (ARGV[8] for tasks made before).
local needs = tonumber(ARGV[8])
if h[6] and tonumber(h[6]) == -1 then needs = 2  -- adaptive: of 3
elseif h[6] and tonumber(h[6]) > 0 then needs = math.floor(tonumber(h[6]) / 2) + 1 end
local quorum, agreeing, commits = '', {}, {}
if valid then
  local by_sha, shas = {}, {}
  local made = redis.call('HGETALL', prefix .. 'm:' .. tid)
  for i = 1, #made, 2 do
    if workers[made[i]] then
      local sha = made[i + 1]
      commits[made[i]] = sha
      if not by_sha[sha] then by_sha[sha] = {}; table.insert(shas, sha) end
      table.insert(by_sha[sha], made[i])
    end
  end
  table.sort(shas)
  for _, sha in ipairs(shas) do
    if #by_sha[sha] >= needs then
      quorum = sha; agreeing = by_sha[sha]; table.sort(agreeing); break
    end
  end
end
if valid and quorum == '' then return {'NOQUORUM'} end
-- Trust: matching commitments in a row; another commitment resets it.
for w, sha in pairs(commits) do
  if sha == quorum then set_trust(prefix, w, nil) else set_trust(prefix, w, 0) end
end
-- Who is paid, failed, late or refunded: store.settle_outcome, step for step.
local refund, paid, late = tonumber(h[3]), {}, {}
for _, w in ipairs(list) do
  local c = prefix .. 'c:' .. w
  local waits = false
  if valid then
    local committed = commits[w] or ''
    if committed == quorum then
      redis.call('HINCRBY', c, 'credits', 1)
      redis.call('HINCRBY', c, 'tasks_completed', 1)
      refund = refund - 1
      table.insert(paid, w)
    elseif released[w] then -- neither paid nor failed: its credit stays in the refund
    elseif committed ~= '' then
      redis.call('HINCRBY', c, 'tasks_failed', 1)
    else -- late: its credit and slot wait for its commitment or the window's end
      waits = true
      refund = refund - 1
      table.insert(late, w)
    end
  end
  if not waits then busy(prefix, w, -1) end
end
table.sort(paid)
table.sort(late)
if #late > 0 then
  local l = prefix .. 'l:' .. tid
  redis.call('HSET', l, 'foreman_id', foreman, 'quorum', quorum)
  for _, w in ipairs(late) do redis.call('HSET', l, 'w:' .. w, '') end
  redis.call('ZADD', prefix .. 'lexp', ARGV[9], tid)
end
redis.call('DEL', t)
redis.call('DEL', prefix .. 'm:' .. tid)
redis.call('ZREM', prefix .. 'texp', tid)
redis.call('SREM', prefix .. 'ft:' .. foreman, tid)
local s = prefix .. 's:' .. tid
redis.call('HSET', s, 'foreman_id', foreman, 'valid', ARGV[4], 'missing', ARGV[6],
  'released', ARGV[7])
if valid then
  redis.call('HSET', s, 'key', h[2], 'quorum', quorum, 'agreeing', table.concat(agreeing, ' '),
    'paid', table.concat(paid, ' '), 'late', table.concat(late, ' '))
end
redis.call('ZADD', prefix .. 'sexp', h[5], tid)
local after = redis.call('HINCRBY', prefix .. 'c:' .. foreman, 'credits', refund)
if valid then
  return {'OK', after, h[2], quorum, table.concat(agreeing, ' '), table.concat(paid, ' '),
    table.concat(late, ' ')}
end
return {'OK', after}
"""
)

# ARGV: prefix, task id, worker, sha256, now. A commitment lives as long as
# its open task (removed by the settle and by expiry); a late worker's is
# judged at once (SqliteStore._commit_late).
_COMMIT = (
    _EXPIRE
    + """
local prefix, tid, worker, sha = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
expire(prefix, ARGV[5])
local workers = redis.call('HGET', prefix .. 't:' .. tid, 'workers')
if not workers then
  local l = prefix .. 'l:' .. tid
  local made = redis.call('HGET', l, 'w:' .. worker)
  if not made then -- a paid worker's repeat, or nobody's
    local s = redis.call('HMGET', prefix .. 's:' .. tid, 'quorum', 'paid')
    for w in string.gmatch(s[2] or '', '%S+') do
      if w == worker then
        if s[1] == sha then return 'committed' end
        return 'conflict'
      end
    end
    return 'NOTFOUND'
  end
  if made ~= '' then
    if made == sha then return 'committed' end
    return 'conflict'
  end
  redis.call('HSET', l, 'w:' .. worker, sha)
  local c = prefix .. 'c:' .. worker
  busy(prefix, worker, -1)
  if sha == redis.call('HGET', l, 'quorum') then
    redis.call('HINCRBY', c, 'credits', 1)
    redis.call('HINCRBY', c, 'tasks_completed', 1)
    set_trust(prefix, worker, nil)
  else
    redis.call('HINCRBY', c, 'tasks_failed', 1)
    set_trust(prefix, worker, 0)
    redis.call('HINCRBY', prefix .. 'c:' .. redis.call('HGET', l, 'foreman_id'), 'credits', 1)
  end
  return 'committed'
end
local assigned = false
for w in string.gmatch(workers, '%S+') do if w == worker then assigned = true end end
if not assigned then return 'NOTFOUND' end
local m = prefix .. 'm:' .. tid
local made = redis.call('HGET', m, worker)
if made then
  if made == sha then return 'committed' end
  return 'conflict'
end
redis.call('HSET', m, worker, sha)
return 'committed'
"""
)

# ARGV: prefix, foreman, task id, now, runtime, exclude and release (each
# sorted, space-separated), request id ('' for none), the remembered form of
# the request, the most workers a task holds per its replication, a seed for
# the draw's random numbers, the spread mode (--diversity), --trusted-after,
# the service's replication (a task made with another keeps its own).
_REPLICA = (
    _EXPIRE
    + DRAW
    + """
local prefix, foreman, tid, now, runtime = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local rid, remembered = ARGV[8], ARGV[9]
local seed, spread, ta, r = tonumber(ARGV[11]), ARGV[12], tonumber(ARGV[13]), tonumber(ARGV[14])
expire(prefix, ARGV[4])
local fkey = prefix .. 'c:' .. foreman
local rname = foreman .. ':' .. rid
if rid ~= '' then
  local seen = redis.call('HMGET', prefix .. 'r:' .. rname, 'exclude', 'reply')
  if seen[1] then
    if seen[1] ~= remembered then return {'MISMATCH'} end
    return {'REPEAT', redis.call('HGET', fkey, 'credits'), seen[2]}
  end
end
local t = prefix .. 't:' .. tid
local h = redis.call('HMGET', t, 'foreman_id', 'escrow', 'workers', 'expiry_unix', 'replication')
if not h[1] or h[1] ~= foreman then return {'NOTFOUND'} end
local adaptive = h[5] and tonumber(h[5]) == -1  -- store.task_replication
if adaptive then r = 3 elseif h[5] and tonumber(h[5]) > 0 then r = tonumber(h[5]) end
local most = tonumber(ARGV[10]) * r
local in_task, kept, excluded = {}, {}, {}
for w in string.gmatch(h[3], '%S+') do in_task[w] = true; excluded[w] = true end
for w in string.gmatch(ARGV[6], '%S+') do excluded[w] = true end
local release, strangers, released = {}, {}, 0
for w in string.gmatch(ARGV[7], '%S+') do
  if in_task[w] then release[w] = true else table.insert(strangers, w) end
end
if #strangers > 0 then return {'STRANGERS', table.concat(strangers, ' ')} end
for w in string.gmatch(h[3], '%S+') do
  if release[w] then released = released + 1 else table.insert(kept, w) end
end
local balance = tonumber(redis.call('HGET', fkey, 'credits'))
if balance + released < 1 then return {'INSUFFICIENT', balance} end
for w, _ in pairs(release) do busy(prefix, w, -1) end
local chosen, address = '', ''
if #kept < most then
  ensure_index(prefix)
  redis.call('ZREMRANGEBYSCORE', prefix .. 'pool', '-inf', now)
  local taken, untrusted = {}, 0
  for _, w in ipairs(kept) do
    local m = redis.call('HMGET', prefix .. 'c:' .. w, 'address', 'network', 'trust')
    local key = m[1]
    if spread == 'network' and m[2] and m[2] ~= '' then key = m[2] end
    taken[key] = true
    if not (ta > 0 and tonumber(m[3] or 0) >= ta) then untrusted = untrusted + 1 end
  end
  local by_foreman = {}  -- the foreman's exclusions, not the task's own workers
  for w in string.gmatch(ARGV[6], '%S+') do by_foreman[w] = true end
  local q = math.floor(r / 2) + 1
  local enough = math.max(q, 2)  -- store.trusted_enough
  local trusted_live = trusted_usable(prefix, now, foreman, runtime, by_foreman, ta, enough)
  -- store.replica_cap: an adaptive task's third is trusted while 2 are live
  local ucap = -1
  if ta > 0 and adaptive and trusted_live >= 2 then ucap = untrusted
  elseif ta > 0 and trusted_live >= q then ucap = r - q end
  -- one slot is all a replica takes: the draw's per-request cap is 1
  local d = new_draw(prefix, now, foreman, runtime, excluded, ta, spread, 1, seed)
  local group = draw_group(d, 1, ucap, false, {}, taken, untrusted)
  finish_draw(d)
  if group then
    chosen, address = group[1].id, group[1].address
    table.insert(kept, chosen)
    busy(prefix, chosen, 1)
  end
end
local added = chosen ~= '' and 1 or 0
redis.call('HSET', t, 'escrow', tonumber(h[2]) - released + added, 'workers',
  table.concat(kept, ' '))
local after = redis.call('HINCRBY', fkey, 'credits', released - added)
if rid ~= '' then
  local reply = ''
  if chosen ~= '' then reply = tid .. '\\t' .. chosen .. '\\t' .. address end
  redis.call('HSET', prefix .. 'r:' .. rname, 'n', '0', 'exclude', remembered, 'reply', reply,
    'expiry', h[4])
  redis.call('ZADD', prefix .. 'rexp', h[4], rname)
end
return {'OK', after, chosen, address}
"""
)

_EXPIRE_ALL = _EXPIRE + "return expire(ARGV[1], ARGV[2])"

# ARGV: prefix, now, caller, runtime ('' any), cap, '1' to spread by network.
# The first `cap` live workers by lease (`pool`) of that runtime other than
# the caller, and their distinct addresses (or networks): {live, spots}.
_LIVE_WORKERS = """
local prefix, now, caller, runtime = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local cap, by_network = tonumber(ARGV[5]), ARGV[6] == '1'
local live, spots, seen, start = 0, 0, {}, 0
while live < cap do
  local ids = redis.call('ZRANGEBYSCORE', prefix .. 'pool', '(' .. now, '+inf', 'LIMIT', start, 256)
  if #ids == 0 then break end
  start = start + #ids
  for _, id in ipairs(ids) do
    if id ~= caller and live < cap then
      local h = redis.call('HMGET', prefix .. 'c:' .. id, 'runtime', 'address', 'network')
      if h[1] and (runtime == '' or h[1] == runtime) then
        live = live + 1
        local spot = h[2] or ''
        if by_network and h[3] and h[3] ~= '' then spot = h[3] end
        if not seen[spot] then seen[spot], spots = true, spots + 1 end
      end
    end
  end
end
return {live, spots}
"""

# ARGV: prefix, expiry: every lease runs to at least that
_RESTART_LEASES = """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', ARGV[1] .. 'leases', '-inf', '(' .. ARGV[2])) do
  redis.call('ZADD', ARGV[1] .. 'leases', ARGV[2], id)
end
"""


def _unavailable_is_clear(method: Callable[..., T]) -> Callable[..., T]:
    """Redis down or too slow: UNAVAILABLE with a message that says so.
    A script either ran whole or not at all, so nothing is half-written."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            raise ServiceUnavailable(
                f"the ledger store (Redis at {self.where}) is unreachable: {error}; try again later"
            ) from None

    return wrapper


def _num(value: bytes) -> float:
    return float(value)


def _record(client_id: str, fields: list) -> ClientRecord | None:
    if not fields:
        return None
    data = dict(zip(fields[::2], fields[1::2], strict=True))
    return ClientRecord(
        client_id=client_id,
        credits=int(data[b"credits"]),
        address=data[b"address"].decode(),
        expiry_unix=_num(data[b"expiry_unix"]),
        slots=int(data[b"slots"]),
        busy_slots=int(data[b"busy_slots"]),
        tasks_completed=int(data[b"tasks_completed"]),
        tasks_failed=int(data[b"tasks_failed"]),
        runtime=data[b"runtime"].decode(),
        tls_certificate=data.get(b"tls_certificate", b"").decode(),
        trust=int(data.get(b"trust", 0)),
    )


class RedisStore(LedgerStore):
    """A LedgerStore on one Redis server (standalone)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        db: int = 0,
        *,
        prefix: str = "ec262:",
        timeout: float = 2.0,
    ) -> None:
        self.where = f"{host}:{port}/{db}"
        self.prefix = prefix
        self._redis = redis.Redis(
            host=host,
            port=port,
            db=db,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One immediate retry re-opens a connection Redis dropped (after
            # a Redis restart); more would only delay the UNAVAILABLE answer.
            retry=Retry(NoBackoff(), 1),
        )
        self._create = self._redis.register_script(_CREATE)
        self._get = self._redis.register_script(_GET)
        self._register = self._redis.register_script(_REGISTER)
        self._commit = self._redis.register_script(_COMMIT)
        self._assign = self._redis.register_script(_ASSIGN)
        self._settle = self._redis.register_script(_SETTLE)
        self._replica = self._redis.register_script(_REPLICA)
        self._restart_leases = self._redis.register_script(_RESTART_LEASES)
        self._expire_all = self._redis.register_script(_EXPIRE_ALL)
        self._live_workers = self._redis.register_script(_LIVE_WORKERS)
        self._random = random.SystemRandom()
        try:
            self._redis.ping()
            logger.info("ledger in Redis %s (prefix %r)", self.where, prefix)
        except redis.exceptions.RedisError as error:
            logger.warning(
                "Redis %s is unreachable for now (%s); calls answer UNAVAILABLE until it is back",
                self.where,
                error,
            )

    def _seed(self) -> int:
        """A fresh seed for one script's draw (Lua's math.randomseed takes
        a 32-bit int)."""
        return self._random.randrange(2**31)

    @staticmethod
    def _now(now: float) -> str:
        return repr(float(now))

    @_unavailable_is_clear
    def create_client(
        self,
        client_id: str,
        secret_hash: bytes,
        credits: int,
        now: float,
        origin: NewClientLimit | None = None,
    ) -> ClientRecord:
        limit = [origin.network, origin.limit, origin.window] if origin else ["", 0, 0]
        made = self._create(
            args=[self.prefix, client_id, secret_hash, credits, self._now(now), *limit]
        )
        if isinstance(made, list):
            raise origin.refused(float(made[1]), now)
        if not made:
            raise RuntimeError(f"client id {client_id} already exists")
        return ClientRecord(client_id=client_id, credits=credits)

    @_unavailable_is_clear
    def secret_hash(self, client_id: str) -> bytes | None:
        return self._redis.hget(f"{self.prefix}c:{client_id}", "secret_hash")

    @_unavailable_is_clear
    def get_client(self, client_id: str, now: float) -> ClientRecord | None:
        return _record(client_id, self._get(args=[self.prefix, client_id, self._now(now)]))

    @_unavailable_is_clear
    def register_worker(
        self,
        client_id: str,
        *,
        address: str,
        slots: int,
        runtime: str,
        expiry_unix: float,
        now: float,
        tls_certificate: str = "",
        network: str = "",
    ) -> ClientRecord:
        fields = self._register(
            args=[
                self.prefix,
                client_id,
                self._now(now),
                "join",
                address,
                slots,
                runtime,
                self._now(expiry_unix),
                tls_certificate,
                network,
            ]
        )
        return self._require(client_id, fields)

    @_unavailable_is_clear
    def certificates(self, client_ids: Iterable[str]) -> dict[str, str]:
        ids = list(dict.fromkeys(client_ids))
        if not ids:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for client_id in ids:
            pipe.hget(f"{self.prefix}c:{client_id}", "tls_certificate")
        return {i: pem.decode() for i, pem in zip(ids, pipe.execute(), strict=True) if pem}

    @_unavailable_is_clear
    def leave_pool(self, client_id: str, now: float) -> ClientRecord:
        fields = self._register(args=[self.prefix, client_id, self._now(now), "leave"])
        return self._require(client_id, fields)

    @staticmethod
    def _require(client_id: str, fields: list) -> ClientRecord:
        record = _record(client_id, fields)
        if record is None:  # authenticated callers exist: a broken invariant
            raise RuntimeError(f"client {client_id} vanished from the ledger")
        return record

    @_unavailable_is_clear
    def assign_tasks(
        self, request: TaskRequest, choose: ChooseWorkers, new_task: NewTask
    ) -> tuple[list[Assignment], int]:
        # `choose` is the SQLite store's Python draw; here the same uniform
        # draw runs inside the script, so it sees slots as they are.
        pairs = [new_task() for _ in range(request.n)]
        args = [
            self.prefix,
            request.foreman_id,
            request.n,
            request.replication,
            self._now(request.now),
            self._now(request.task_expiry_unix),
            request.runtime,
            " ".join(sorted(request.exclude_workers)),
            request.request_id,
            request.spread,
            MAX_SLOTS_PER_REQUEST,
            request.trusted_after,
            "".join("1" if spot else "0" for spot in request.spot_checks),
            trusted_enough(request.replication),
            self._seed(),
        ]
        for task_id, key in pairs:
            args += [task_id, key]
        reply = self._assign(args=args)
        if reply[0] == b"INSUFFICIENT":
            raise insufficient_credits(request, int(reply[1]), int(reply[2]))
        if reply[0] == b"MISMATCH":
            raise request_mismatch(request, int(reply[1]), reply[2].decode())
        if reply[0] == b"REPEAT":
            return assignments_from_text(reply[2].decode(), _num(reply[3])), int(reply[1])
        assignments = []
        for index in range(2, len(reply), 3):
            ids = reply[index + 1].decode().split(" ")
            addresses = reply[index + 2].decode().split(" ")
            assignments.append(
                Assignment(
                    task_id=reply[index].decode(),
                    workers=tuple(WorkerRef(w, a) for w, a in zip(ids, addresses, strict=True)),
                    expiry_unix=request.task_expiry_unix,
                )
            )
        return assignments, int(reply[1])

    @_unavailable_is_clear
    def ledger_id(self) -> str:
        key = f"{self.prefix}ledger_id"
        self._redis.set(key, str(uuid.uuid4()), nx=True)
        return self._redis.get(key).decode()

    @_unavailable_is_clear
    def live_workers(
        self,
        foreman_id: str,
        runtime: str,
        now: float,
        spread: str = IDENTITY,
        cap: int = LIVE_COUNT_CAP,
    ) -> tuple[int, int]:
        """The first `cap` live workers by lease, counted in one script
        (a pipeline of one HMGET per live worker took 375 ms with 10,000)."""
        live, spots = self._live_workers(
            args=[self.prefix, repr(now), foreman_id, runtime, cap, int(spread == NETWORK)]
        )
        return int(live), int(spots)

    @_unavailable_is_clear
    def fetch_key(self, worker_id: str, task_id: str, now: float) -> tuple[bytes, str] | None:
        key, foreman, expiry, workers = self._redis.hmget(
            f"{self.prefix}t:{task_id}", "key", "foreman_id", "expiry_unix", "workers"
        )
        if key is None or _num(expiry) <= now or worker_id not in workers.decode().split():
            return None
        return key, foreman.decode()

    @_unavailable_is_clear
    def is_late(self, worker_id: str, task_id: str, now: float) -> bool:
        late = f"{self.prefix}l:{task_id}"
        with self._redis.pipeline(transaction=False) as pipe:
            made, until = (
                pipe.hget(late, f"w:{worker_id}").zscore(f"{self.prefix}lexp", task_id).execute()
            )
        return made == b"" and until is not None and until > now

    @_unavailable_is_clear
    def settle_task(
        self,
        foreman_id: str,
        task_id: str,
        *,
        valid: bool,
        missing: frozenset[str],
        now: float,
        released: frozenset[str] = frozenset(),
        quorum: int = 2,
        late_until: float = 0.0,
    ) -> Settlement | None:
        reply = self._settle(
            args=[
                self.prefix,
                foreman_id,
                task_id,
                "1" if valid else "0",
                self._now(now),
                " ".join(sorted(missing)) if valid else "",
                " ".join(sorted(released)) if valid else "",
                quorum,
                self._now(late_until),
            ]
        )
        status = reply[0]
        if status == b"NOTFOUND":
            return None
        if status == b"CONFLICT":
            raise settle_conflict(task_id, reply[1] == b"1", reply[2].decode())
        if status == b"STRANGERS":
            raise not_assigned(task_id, reply[1].decode(), reply[2].decode().split())
        if status == b"NOQUORUM":
            raise no_committed_quorum(task_id, quorum)
        if not valid:
            return Settlement(key=None, credits=int(reply[1]))
        return Settlement(
            key=reply[2],
            credits=int(reply[1]),
            quorum_sha256=reply[3].decode(),
            agreeing=tuple(reply[4].decode().split()),
            paid=tuple(reply[5].decode().split()),
            late=tuple(reply[6].decode().split()),
        )

    @_unavailable_is_clear
    def commit_result(self, worker_id: str, task_id: str, sha256: str, now: float) -> str | None:
        reply = self._commit(args=[self.prefix, task_id, worker_id, sha256, self._now(now)])
        return None if reply == b"NOTFOUND" else reply.decode()

    @_unavailable_is_clear
    def add_replica(
        self, request: ReplicaRequest, choose: ChooseWorkers
    ) -> tuple[WorkerRef | None, int] | None:
        # `choose` is the SQLite store's draw; here a uniform draw runs in
        # the script, as for RequestTasks.
        reply = self._replica(
            args=[
                self.prefix,
                request.foreman_id,
                request.task_id,
                self._now(request.now),
                request.runtime,
                " ".join(sorted(request.exclude_workers)),
                " ".join(sorted(request.release_workers)),
                request.request_id,
                request.remembered_as(),
                MAX_WORKERS_PER_REPLICA,
                self._seed(),
                request.spread,
                request.trusted_after,
                request.replication,
            ]
        )
        status = reply[0]
        if status == b"NOTFOUND":
            return None
        if status == b"MISMATCH":
            raise InvalidRequest(f"request_id {request.request_id!r} was used for another request")
        if status == b"STRANGERS":
            raise not_assigned(request.task_id, "release_workers", reply[1].decode().split())
        if status == b"INSUFFICIENT":
            raise InsufficientCredits(1, int(reply[1]), "not enough credits: a replica costs 1")
        if status == b"REPEAT":
            made = assignments_from_text(reply[2].decode(), 0.0)
            return (made[0].workers[0] if made else None), int(reply[1])
        chosen = reply[2].decode()
        return (WorkerRef(chosen, reply[3].decode()) if chosen else None), int(reply[1])

    @_unavailable_is_clear
    def expire_tasks(self, now: float) -> int:
        return int(self._expire_all(args=[self.prefix, self._now(now)]))

    @_unavailable_is_clear
    def renew_leases(self, expiries: Mapping[str, float]) -> None:
        self._redis.zadd(f"{self.prefix}leases", dict(expiries), gt=True)

    @_unavailable_is_clear
    def restart_leases(self, expiry_unix: float) -> None:
        self._restart_leases(args=[self.prefix, self._now(expiry_unix)])

    @_unavailable_is_clear
    def totals(self) -> LedgerTotals:
        clients = credits = escrow = tasks = 0
        for key in self._redis.scan_iter(match=f"{self.prefix}c:*", count=1000):
            clients += 1
            credits += int(self._redis.hget(key, "credits"))
        for key in self._redis.scan_iter(match=f"{self.prefix}t:*", count=1000):
            tasks += 1
            escrow += int(self._redis.hget(key, "escrow"))
        for key in self._redis.scan_iter(match=f"{self.prefix}l:*", count=1000):
            fields = self._redis.hgetall(key)
            escrow += sum(1 for name, sha in fields.items() if name.startswith(b"w:") and not sha)
        issued = int(self._redis.get(f"{self.prefix}issued") or 0)
        return LedgerTotals(
            clients=clients,
            client_credits=credits,
            escrowed_credits=escrow,
            open_tasks=tasks,
            starting_credits_issued=issued,
        )

    def close(self) -> None:
        self._redis.close()
