"""The Redis store's index of its worker pool, and its draw, in Lua.

Why: the assignment scripts read every live worker's hash per request
(issue 16, item 5). These keys (under the store's prefix) let them touch
O(replication x n) keys instead:

- `free`: sorted set of the pooled workers (those in `pool`) with a free
  slot, scored by lease expiry: the scripts drop lapsed ones by score
  (ZREMRANGEBYSCORE) and read a uniform position by rank (ZRANGE i i).
  Every change of busy_slots goes through `busy`, and registration, leave
  and the pool's expiry through `sync_free` / `unpool`, so it stays exact.
- `trust` and `trust:<runtime>`: sorted sets of the pooled workers scored by
  their trust, for the trust rule's count (stopping at
  store.trusted_enough) and for listing a trust class with few members.
  A lapsed worker leaves them the first time a read meets it.
- `pool_index`: set once the keys above were built from `pool`; a ledger
  written before them gets them on its first draw.

DRAW is draws.draw_groups step for step (the same attempts, the same
exact fallback), with its random numbers from math.random seeded by a
number the front-end passes in, so a draw stays reproducible from its
arguments. The Python module is the reference; a change there belongs
here too.
"""

from __future__ import annotations

from discovery_service.draws import DRAW_ATTEMPTS, FEW_OF_A_CLASS

# Shared by every script that changes slots, leases or trust.
POOL = """
local function sync_free(prefix, id)
  local h = redis.call('HMGET', prefix .. 'c:' .. id, 'slots', 'busy_slots')
  local lease = redis.call('ZSCORE', prefix .. 'pool', id)
  if lease and h[1] and tonumber(h[2]) < tonumber(h[1]) then
    redis.call('ZADD', prefix .. 'free', lease, id)
  else
    redis.call('ZREM', prefix .. 'free', id)
  end
end
local function busy(prefix, id, delta)
  redis.call('HINCRBY', prefix .. 'c:' .. id, 'busy_slots', delta)
  sync_free(prefix, id)
end
-- value: the new trust, or nil for one more
local function set_trust(prefix, id, value)
  local c = prefix .. 'c:' .. id
  local t = value
  if value then redis.call('HSET', c, 'trust', value)
  else t = redis.call('HINCRBY', c, 'trust', 1) end
  local runtime = redis.call('HGET', c, 'runtime') or ''
  redis.call('ZADD', prefix .. 'trust', 'XX', t, id)
  redis.call('ZADD', prefix .. 'trust:' .. runtime, 'XX', t, id)
end
local function join_pool(prefix, id, expiry, old_runtime)
  local c = prefix .. 'c:' .. id
  local h = redis.call('HMGET', c, 'trust', 'runtime')
  if old_runtime and old_runtime ~= h[2] then
    redis.call('ZREM', prefix .. 'trust:' .. old_runtime, id)
  end
  redis.call('ZADD', prefix .. 'pool', expiry, id)
  redis.call('ZADD', prefix .. 'trust', tonumber(h[1] or 0), id)
  redis.call('ZADD', prefix .. 'trust:' .. (h[2] or ''), tonumber(h[1] or 0), id)
  sync_free(prefix, id)
end
local function unpool(prefix, id)
  local runtime = redis.call('HGET', prefix .. 'c:' .. id, 'runtime') or ''
  for _, key in ipairs({'pool', 'free', 'trust', 'trust:' .. runtime}) do
    redis.call('ZREM', prefix .. key, id)
  end
end
"""

# The draw (needs POOL). ensure_index, trusted_usable and new_draw /
# draw_one are called by the assignment and replica scripts.
DRAW = f"""
local ATTEMPTS, FEW = {DRAW_ATTEMPTS}, {FEW_OF_A_CLASS}
local function ensure_index(prefix)
  if redis.call('EXISTS', prefix .. 'pool_index') == 1 then return end
  for _, id in ipairs(redis.call('ZRANGE', prefix .. 'pool', 0, -1)) do
    join_pool(prefix, id, redis.call('ZSCORE', prefix .. 'pool', id), nil)
  end
  redis.call('SET', prefix .. 'pool_index', '1')
end
local function trust_key(prefix, runtime)
  if runtime == '' then return prefix .. 'trust' end
  return prefix .. 'trust:' .. runtime
end
-- sqlite_pool.trusted_usable: live trusted workers of the runtime, not the
-- foreman nor excluded, counted up to `enough`; lapsed ones leave the pool.
local function trusted_usable(prefix, now, foreman, runtime, excluded, ta, enough)
  if ta <= 0 then return 0 end
  local key, count, offset, lapsed = trust_key(prefix, runtime), 0, 0, {{}}
  while count < enough do
    local ids = redis.call('ZRANGEBYSCORE', key, ta, '+inf', 'LIMIT', offset, 16)
    if #ids == 0 then break end
    offset = offset + #ids
    for _, id in ipairs(ids) do
      local lease = redis.call('ZSCORE', prefix .. 'pool', id)
      if not lease or tonumber(lease) <= now then table.insert(lapsed, id)
      elseif id ~= foreman and not excluded[id] then
        count = count + 1
        if count >= enough then break end
      end
    end
  end
  for _, id in ipairs(lapsed) do unpool(prefix, id) end
  return count
end
-- One request's draw (draws._Draw): `free` without lapsed workers, read by
-- rank; candidates memoised; `lapsed` un-pooled by finish_draw.
local function new_draw(prefix, now, foreman, runtime, excluded, ta, spread, cap, seed)
  math.randomseed(seed)
  redis.call('ZREMRANGEBYSCORE', prefix .. 'free', '-inf', now)
  return {{prefix = prefix, now = now, foreman = foreman, runtime = runtime,
    excluded = excluded, ta = ta, spread = spread, cap = cap, seen = {{}}, lapsed = {{}},
    size = redis.call('ZCARD', prefix .. 'free'), everyone = nil, classes = {{}}}}
end
local function candidate(d, id)
  local v = d.seen[id]
  if v ~= nil then return v end
  v = false
  if id ~= d.foreman and not d.excluded[id] then
    local h = redis.call('HMGET', d.prefix .. 'c:' .. id, 'slots', 'busy_slots', 'address',
      'runtime', 'network', 'trust', 'expiry_unix')
    if h[1] and tonumber(h[7]) <= d.now then table.insert(d.lapsed, id)
    elseif h[1] and (d.runtime == '' or h[4] == d.runtime) then
      local key = h[3]
      if d.spread == 'network' and h[5] and h[5] ~= '' then key = h[5] end
      v = {{id = id, address = h[3], key = key,
        free = math.min(tonumber(h[1]) - tonumber(h[2]), d.cap),
        trusted = d.ta > 0 and tonumber(h[6] or 0) >= d.ta}}
    end
  end
  d.seen[id] = v
  return v
end
-- FreePool.members: every candidate with a free slot (trusted nil), or
-- those of one class; nil when the class has more than `limit`.
local function members(d, trusted, limit)
  local ids
  if trusted == nil then ids = redis.call('ZRANGE', d.prefix .. 'free', 0, -1)
  elseif d.ta <= 0 then
    if trusted then return {{}} end
    if limit then return nil end
    return members(d, nil, nil)
  else
    local key, low, high = trust_key(d.prefix, d.runtime), d.ta, '+inf'
    if not trusted then low, high = '-inf', '(' .. d.ta end
    if limit then
      ids = redis.call('ZRANGEBYSCORE', key, low, high, 'LIMIT', 0, limit + 1)
      if #ids > limit then return nil end
    else ids = redis.call('ZRANGEBYSCORE', key, low, high) end
  end
  local found = {{}}
  for _, id in ipairs(ids) do
    local c = candidate(d, id)
    if c and c.free > 0 then table.insert(found, c) end
  end
  return found
end
local function uniform(list)
  if #list == 0 then return nil end
  return list[1 + math.floor(math.random() * #list)]
end
-- draws._Draw.one: a uniform pick among the candidates with a slot left
-- (`used`), no spread key in `keys`, of class `trusted` unless nil.
local function draw_one(d, trusted, used, keys)
  local function fits(c)
    return c and (trusted == nil or c.trusted == trusted) and (used[c.id] or 0) < c.free
      and not keys[c.key]
  end
  local function among(list)
    local ok = {{}}
    for _, c in ipairs(list) do if fits(c) then table.insert(ok, c) end end
    return uniform(ok)
  end
  if not d.everyone and trusted ~= nil then
    if d.classes[trusted] == nil then d.classes[trusted] = members(d, trusted, FEW) or false end
    if d.classes[trusted] then return among(d.classes[trusted]) end
  end
  if not d.everyone then
    for _ = 1, (d.size > 0 and ATTEMPTS or 0) do
      local rank = math.floor(math.random() * d.size)
      local id = redis.call('ZRANGE', d.prefix .. 'free', rank, rank)[1]
      local c = id and candidate(d, id)
      if fits(c) then return c end
    end
    d.everyone = members(d, nil, nil)
  end
  return among(d.everyone)
end
-- draws.draw_groups's inner loop for one group: `size` workers, at most
-- `ucap` untrusted (-1: no cap; `untrusted` there already), an untrusted
-- one first when `first`; nil when the group cannot be filled.
local function draw_group(d, size, ucap, first, used, keys, untrusted)
  local chosen = {{}}
  while #chosen < size do
    local only = ucap >= 0 and untrusted >= ucap
    local pick = nil
    if first and #chosen == 0 and not only then pick = draw_one(d, false, used, keys) end
    if not pick then pick = draw_one(d, only and true or nil, used, keys) end
    if not pick then return nil end
    table.insert(chosen, pick)
    if not pick.trusted then untrusted = untrusted + 1 end
    keys[pick.key] = true
  end
  return chosen
end
local function finish_draw(d)
  for _, id in ipairs(d.lapsed) do
    if tonumber(redis.call('HGET', d.prefix .. 'c:' .. id, 'expiry_unix')) <= d.now then
      unpool(d.prefix, id)
    end
  end
end
"""
