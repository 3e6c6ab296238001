#!lua name=plan_limits
-- The filter's Redis side: one Redis Functions library (Redis >= 7.0), loaded once by an admin
-- (`plan-limits functions load`, or FUNCTION LOAD REPLACE) and called with FCALL by a Redis
-- user that may run nothing else. Each call runs atomically, so reserve / commit / release /
-- extend never interleave with another request's. Every key a function touches is one of its
-- declared keys, and all of one call's keys share the user's {hash tag} but the event stream.

-- plan_limits_reserve: reserve one unit of an action's allowance, or refuse. Committed units
-- (the summary's counter) plus unexpired reservations count against the limit, so concurrent
-- requests can never take more than the limit between them. The plan is the entitlement
-- record's (written by billing: `plan-limits set-plan`), else the one the caller claims; a
-- plan the filter does not know falls back to `fallback` ('' = no fallback).
-- A request with an idempotency key is one request however often it is sent: its key's
-- marker says 'pending:<reservation id>' while it is in flight and 'done:<time>' once it was
-- counted (a failure deletes it), for the key's lifetime.
-- A request that adds to one of the user's running totals (a gauge, not per period: bytes in
-- storage, members of the team) also holds what it would add ('<id>|<amount>' in the gauge's
-- held set) while in flight: the total plus what is held plus its own must fit the plan's room.
-- A reservation that expired unsettled (its Envoy died with the request in flight, or could
-- not reach Redis for longer than the expiry) is recorded as a `reservation_expired` event
-- when the next call finds it (a hold of a gauge as `hold_expired`): what such an Envoy may
-- have lost is on record. Pending sets are kept a week past their last use, so that
-- `plan-limits audit` finds those no later call comes for.
-- A user has at most so many idempotency keys remembered at once (an index of their markers,
-- by expiry): past it, a new key is refused.
-- keys: summary, pending, entitlement, the idempotency key's marker, the gauge, the gauge's
--       held set, the user's events stream, the user's index of idempotency keys (a key
--       without its use is any key of the user's).
-- A lease: a request that asks for one (a limited action, no idempotency key, no gauge) and is
-- granted while much remains (at least `room factor` times the lease) also gets the lease's
-- other units, held like its own under '<id>#1' ... '<id>#<n-1>': its worker admits the
-- requests that follow from them, commits those that succeed and releases the rest.
-- args: action, claimed plan, fallback plan, reservation id, now (ms), expiry (ms), ttl (ms),
--       the marker's lifetime (ms; '' = no key), the amount it would add to the gauge ('' = the
--       action adds to none), the user, the period, the most keys remembered at once, the
--       lease's units ('' = no lease), its room factor, then per plan: its name, its limit for
--       the action and its room in the gauge ('' = unlimited).
-- Returns {status, committed, pending, plan, named plan, recorded, granted, marker, anchor,
-- stored, held, leased}: status 1 granted, 0 refused (limit reached), 2 unlimited under that plan
-- (nothing reserved), 3 the plan is unknown (nothing reserved), 4 a duplicate (nothing
-- reserved; marker is what the first one's says), 5 the gauge is full (nothing reserved), 6
-- too many idempotency keys (nothing reserved);
-- plan is the one applied, named plan the one the record or the claim named; recorded 1 when
-- billing's record named it; granted the extra units an operator gave for the period (the
-- limit checked is the plan's plus these); anchor the subscription's anchor day billing
-- recorded ('' if none); total and held the gauge's before this request; leased the units
-- held besides the request's own for its worker's lease (pending counts them).
-- Scores use the filter's clock; the key's own expiry is relative, so a clock that differs
-- from Redis's cannot expire it early.
local KEEP_EXPIRED_MS = 7 * 86400000
-- The period's last counted uses that recorded metadata, kept in its summary for the usage
-- page.
local RECENT = 10

local function reap_expired(set, now, events, event)
  local expired = redis.call('ZRANGEBYSCORE', set, '-inf', now)
  if #expired == 0 then
    return
  end
  redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
  for _, member in ipairs(expired) do
    redis.call('XADD', events, '*', unpack(event(member)))
  end
end

local function reserve(keys, args)
  local summary, pending, entitlement = keys[1], keys[2], keys[3]
  local marker, gauge, gauge_held, events = keys[4], keys[5], keys[6], keys[7]
  local index = keys[8]
  local action, claimed, fallback, id = args[1], args[2], args[3], args[4]
  local now, expires, ttl = tonumber(args[5]), tonumber(args[6]), tonumber(args[7])
  local marker_ttl, amount = tonumber(args[8]), tonumber(args[9])
  local user, period, max_keys = args[10], args[11], tonumber(args[12])
  local lease_units, room_factor = tonumber(args[13]), tonumber(args[14])
  local at = tostring(now)
  local function terms_of(plan)
    for i = 15, #args - 2, 3 do
      if args[i] == plan then
        return true, tonumber(args[i + 1]), tonumber(args[i + 2])
      end
    end
    return false, nil, nil
  end
  local record, anchor = unpack(redis.call('HMGET', entitlement, 'plan', 'anchor_day'))
  anchor = anchor or ''
  local named = record or claimed
  local recorded = record and 1 or 0
  local plan = named
  local known, limit, room = terms_of(plan)
  if not known and fallback ~= '' then
    plan = fallback
    known, limit, room = terms_of(plan)
  end
  reap_expired(pending, now, events, function(member)
    return {'event', 'reservation_expired', 'user', user, 'action', action,
      'reservation', member, 'period', period, 'at_ms', at}
  end)
  local committed = tonumber(redis.call('HGET', summary, action) or '0')
  local held = redis.call('ZCARD', pending)
  -- Extra units an operator granted for the period (`plan-limits grant`).
  local granted = tonumber(redis.call('HGET', summary, 'grant:' .. action) or '0')
  local total, total_held = 0, 0
  local function answer(status, first, in_flight, leased)
    return {status, committed, in_flight, plan, named, recorded, granted, first, anchor,
      total, total_held, leased or 0}
  end
  if not known then
    return answer(3, '', held)
  end
  if marker_ttl then
    -- (A reservation asked again under the same id, in another period, is not its own repeat.)
    local first = redis.call('GET', marker)
    if first and first ~= 'pending:' .. id then
      return answer(4, first, held)
    end
    if not first and max_keys then
      redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
      if redis.call('ZCARD', index) >= max_keys then
        return answer(6, '', held)
      end
    end
  end
  local limits_gauge = amount and room
  if limits_gauge then
    reap_expired(gauge_held, now, events, function(member)
      local held_id, held_amount = string.match(member, '^(.*)|(%d+)$')
      return {'event', 'hold_expired', 'user', user, 'action', action,
        'reservation', held_id or member, 'amount', held_amount or '', 'at_ms', at}
    end)
    total = tonumber(redis.call('GET', gauge) or '0')
    for _, member in ipairs(redis.call('ZRANGE', gauge_held, 0, -1)) do
      total_held = total_held + tonumber(string.match(member, '|(%d+)$') or '0')
    end
    if total + total_held + amount > room then
      return answer(5, '', held)
    end
  end
  local function hold()
    if marker_ttl then
      redis.call('SET', marker, 'pending:' .. id, 'PX', marker_ttl)
      redis.call('ZADD', index, now + marker_ttl, marker)
      redis.call('PEXPIRE', index, marker_ttl)
    end
    if limits_gauge then
      redis.call('ZADD', gauge_held, expires, id .. '|' .. amount)
      redis.call('PEXPIRE', gauge_held, ttl + KEEP_EXPIRED_MS)
    end
  end
  if limit == nil then
    hold()
    return answer(2, '', held)
  end
  if committed + held >= limit + granted then
    return answer(0, '', held)
  end
  redis.call('ZADD', pending, expires, id)
  local leased = 0
  if lease_units and not marker_ttl and not amount
      and limit + granted - committed - held - 1 >= room_factor * lease_units then
    leased = lease_units - 1
    for k = 1, leased do
      redis.call('ZADD', pending, expires, id .. '#' .. k)
    end
  end
  redis.call('PEXPIRE', pending, ttl + KEEP_EXPIRED_MS)
  hold()
  return answer(1, '', held + 1 + leased, leased)
end

-- plan_limits_reserve_many: several reservations in one call, one after the other exactly as
-- plan_limits_reserve would make them (a worker sends the requests that arrived while its
-- previous reservation call was in flight as one, like a group commit).
-- keys: each reservation's eight keys, in order.
-- args: per reservation, the count of its args, then its args.
-- Returns the reservations' answers one after the other, flat (webdis renders nested
-- arrays as null): twelve items each.
local function reserve_many(keys, args)
  local out = {}
  local a = 1
  for i = 0, #keys / 8 - 1 do
    local n = tonumber(args[a])
    local answer = reserve({unpack(keys, 8 * i + 1, 8 * i + 8)}, {unpack(args, a + 1, a + n)})
    a = a + n + 1
    for _, item in ipairs(answer) do
      out[#out + 1] = item
    end
  end
  return out
end

-- plan_limits_settle_v2: a batch of settlements, each one of
--   commit  - the upstream succeeded: the reservation becomes a count. A commit whose
--             reservation already expired (Redis unreachable for longer than the
--             reservation's expiry) still counts, once: the success happened;
--   count   - a success that had no reservation (unlimited plan, or Redis was down): count it;
--   release - the upstream failed or the client left: drop the reservation;
--   extend  - the request is still in flight: push its reservation's expiry back;
--   give_back - a release route succeeded (files deleted, a member removed): the amount leaves
--             the user's gauge named as the action (never below 0);
--   lost    - a worker gave up settlements of the user and action (the amount; kind says
--             why): recorded as a `lost` event, and in the summary as `lost:<action>`.
-- A batch is applied once: it names its worker's record and its sequence number, and runs
-- only if that number is past the last one applied for the worker (a batch sent again because
-- its first answer was lost finds its number there, and nothing runs). The record (a hash:
-- `seq`, `at`, `queued`, `stopped`) also says when the worker was last heard of and whether it
-- stopped cleanly: a batch without items is a worker's heartbeat, or its goodbye. A worker
-- that went silent without a goodbye was killed (what it had queued since is lost), and
-- `plan-limits audit` says so.
-- Every count also updates the monthly summary and the day's counters (the history; by kind
-- too, as `<action>:<kind>`) and appends a usage event (with the request's `metadata` when the
-- action records any, `grace` 1 for a success past the limit in the plan's grace; its outcome `success`, or `unknown` for a request forwarded whole
-- whose answer never came: its client left, or Envoy gave up waiting); a count that brings the period's to a warning threshold (a share of
-- the plan's limit plus grants) appends one `threshold_crossed` event, once per user, action,
-- period and threshold (marked in the summary).
-- An item whose values are out of range is not applied and never stops the others: it is
-- recorded as a `settle_refused` event instead.
-- A request sent with an idempotency key marks it 'done:<time>' when counted, and deletes
-- the marker its reservation set when released (a retry is then a new request). A request
-- that adds to a gauge adds its amount (an upload's body's bytes, one member) when counted,
-- and what it held is let go whatever the outcome.
-- keys: events stream, the worker's last applied batch, then every key the items name, each
--       once (a batch of one user's settlements names that user's keys once, not per item).
--       An item names its own by their positions in `keys`: summary, pending, commits (recent
--       commit ids), entitlement, the day's counters, the idempotency key's marker, the gauge,
--       its held set (any key of the user's for one it does not use).
-- args: how the stream is trimmed ('' keep all, 'MAXLEN' to about a length, 'MINID' of
--       events older than an age in ms, by Redis's clock, which names the events) and its
--       threshold, now (ms), reservation ttl (ms), how long
--       commit ids are remembered (ms), how long days are kept (ms), the warning thresholds
--       (percent, comma-separated), fields per item, the batch's sequence number, how long it
--       is remembered (ms), how many settlements the worker still has queued, '1' if it is
--       stopping, then the items' fields, an item's keys' positions (space-separated) last; an
--       item's limits are '' when they are the item before's.
-- Returns {0} if the batch was applied before; else {1, then per item {counted or extended
-- (1/0, -1 refused), the user's entitled plan or false, the anchor day billing recorded or
-- false}}, flattened.
local function settle_v2(keys, args)
  local trim, threshold, now, ttl = args[1], args[2], tonumber(args[3]), tonumber(args[4])
  local remember, keep_days = tonumber(args[5]), tonumber(args[6])
  local thresholds, stride = {}, tonumber(args[8])
  local seq, applied_memory = tonumber(args[9]), tonumber(args[10])
  local queued, stopping = args[11], args[12] == '1' and '1' or '0'
  local applied = keys[2]
  if #keys == 2 then
    redis.call('HSET', applied, 'at', args[3], 'queued', queued, 'stopped', stopping)
    redis.call('PEXPIRE', applied, applied_memory)
    return {1}
  end
  if seq <= tonumber(redis.call('HGET', applied, 'seq') or '0') then
    return {0}
  end
  redis.call('HSET', applied, 'seq', seq, 'at', args[3], 'queued', queued, 'stopped', stopping)
  redis.call('PEXPIRE', applied, applied_memory)
  for t in string.gmatch(args[7], '%d+') do
    thresholds[#thresholds + 1] = tonumber(t)
  end
  if trim == 'MINID' then
    local t = redis.call('TIME')
    threshold = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(threshold))
  end
  local function append(event)
    if trim == '' then
      redis.call('XADD', keys[1], '*', unpack(event))
    else
      redis.call('XADD', keys[1], trim, '~', threshold, '*', unpack(event))
    end
  end
  -- An amount Lua counts exactly: digits, at most 2^53.
  local function amount_ok(text)
    return text == ''
      or (#text <= 16 and string.match(text, '^%d+$') ~= nil and tonumber(text) <= 2 ^ 53)
  end
  local results = {1}
  -- A batch often holds many settlements of one user: the summary's plan, limits and expiry
  -- are written once per summary.
  local written = {}
  -- Limits decoded once per distinct limits in the batch (most items share their plan's).
  local decoded_limits = {}
  local function apply(k, f)
    local summary, pending, commits, _, day, marker, gauge, gauge_held = unpack(k)
    local mode, id, action, user = args[f + 1], args[f + 2], args[f + 3], args[f + 4]
    local plan, limits, kind, bytes = args[f + 5], args[f + 6], args[f + 7], args[f + 8]
    local status, at, request_id, period = args[f + 9], args[f + 10], args[f + 11], args[f + 12]
    local keep_for, idempotency_key = args[f + 13], args[f + 14]
    local adds, holds, outcome, metadata = args[f + 15], args[f + 16], args[f + 17], args[f + 18]
    local in_grace = args[f + 19]
    if not (amount_ok(adds) and amount_ok(holds) and amount_ok(bytes)) then
      error('an amount out of range')
    end
    local held_member = id .. '|' .. holds
    if mode == 'give_back' then
      local stored = tonumber(redis.call('GET', gauge) or '0')
      local left = stored - math.min(stored, tonumber(adds))
      redis.call('SET', gauge, string.format('%d', left))
      append({'event', 'given_back', 'user', user, 'gauge', action, 'amount', adds,
        'status', status, 'at', at, 'request_id', request_id})
      return 1
    elseif mode == 'lost' then
      if period ~= '' then
        redis.call('HINCRBY', summary, 'lost:' .. action, adds)
      end
      append({'event', 'lost', 'user', user, 'action', action, 'units', adds, 'reason', kind,
        'plan', plan, 'period', period, 'at', at})
      return 1
    elseif mode == 'extend' then
      local done = 0
      if redis.call('ZSCORE', pending, id) then
        redis.call('ZADD', pending, 'XX', now + ttl, id)
        redis.call('PEXPIRE', pending, ttl + KEEP_EXPIRED_MS)
        done = 1
      end
      if holds ~= '' and redis.call('ZSCORE', gauge_held, held_member) then
        redis.call('ZADD', gauge_held, 'XX', now + ttl, held_member)
        redis.call('PEXPIRE', gauge_held, ttl + KEEP_EXPIRED_MS)
      end
      return done
    end
    if holds ~= '' then
      redis.call('ZREM', gauge_held, held_member)
    end
    local held = 0
    if id ~= '' then
      held = redis.call('ZREM', pending, id)
    end
    if mode == 'release' and idempotency_key ~= ''
        and redis.call('GET', marker) == 'pending:' .. id then
      redis.call('DEL', marker)
    end
    local counts = mode == 'count'
    if mode == 'commit' then
      counts = held == 1 or not redis.call('ZSCORE', commits, id)
      redis.call('ZADD', commits, now, id)
      redis.call('ZREMRANGEBYSCORE', commits, '-inf', now - remember)
      redis.call('PEXPIRE', commits, remember)
    end
    if not counts then
      return 0
    end
    local count = redis.call('HINCRBY', summary, action, 1)
    redis.call('HINCRBY', day, action, 1)
    if kind ~= '' then
      -- The day's count by kind too (the history's `by=kind`).
      redis.call('HINCRBY', day, action .. ':' .. kind, 1)
    end
    if not written[summary] then
      redis.call('HSET', summary, 'plan', plan, 'limits', limits, 'updated_at', at)
      redis.call('PEXPIRE', summary, keep_for)
      written[summary] = true
    end
    if not written[day] then
      redis.call('PEXPIRE', day, keep_days)
      written[day] = true
    end
    if idempotency_key ~= '' and redis.call('EXISTS', marker) == 1 then
      redis.call('SET', marker, 'done:' .. at, 'KEEPTTL')
    end
    if adds ~= '' then
      redis.call('INCRBY', gauge, adds)
    end
    local event = {'event', 'usage', 'user', user, 'action', action, 'kind', kind, 'bytes', bytes,
      'status', status, 'at', at, 'request_id', request_id, 'plan', plan, 'period', period,
      'idempotency_key', idempotency_key, 'reservation', id, 'outcome', outcome}
    if metadata ~= '' then
      event[#event + 1], event[#event + 2] = 'metadata', metadata
    end
    if in_grace ~= '' then
      event[#event + 1], event[#event + 2] = 'grace', '1'
    end
    append(event)
    if metadata ~= '' then
      -- Newest first, at most RECENT (the summary's `recent`, a JSON array).
      local ok, recent = pcall(cjson.decode, redis.call('HGET', summary, 'recent') or '[]')
      if not ok or type(recent) ~= 'table' then
        recent = {}
      end
      local parsed, fields = pcall(cjson.decode, metadata)
      table.insert(recent, 1, {at = at, action = action, kind = kind,
        metadata = parsed and fields or metadata})
      while #recent > RECENT do
        table.remove(recent)
      end
      redis.call('HSET', summary, 'recent', cjson.encode(recent))
    end
    local decoded = decoded_limits[limits]
    if decoded == nil then
      local ok, value = pcall(cjson.decode, limits)
      decoded = ok and type(value) == 'table' and value or false
      decoded_limits[limits] = decoded
    end
    local limit = decoded and decoded[action]
    if type(limit) == 'number' and limit > 0 then
      limit = limit + tonumber(redis.call('HGET', summary, 'grant:' .. action) or '0')
      for _, t in ipairs(thresholds) do
        if count * 100 >= t * limit
            and redis.call('HSETNX', summary, 'warned:' .. action .. ':' .. t, at) == 1 then
          append({'event', 'threshold_crossed', 'user', user, 'action', action,
            'threshold', t, 'used', count, 'limit', limit, 'plan', plan, 'period', period,
            'at', at})
        end
      end
    end
    return 1
  end
  local last_limits = ''
  for i = 0, (#args - 12) / stride - 1 do
    local f = 12 + stride * i
    local k = {}
    for position in string.gmatch(args[f + stride], '%d+') do
      k[#k + 1] = keys[tonumber(position)]
    end
    if args[f + 6] == '' then
      args[f + 6] = last_limits
    else
      last_limits = args[f + 6]
    end
    -- (Values are checked before anything is written, so a refused item wrote nothing.)
    local ok, done = pcall(apply, k, f)
    if not ok then
      append({'event', 'settle_refused', 'user', args[f + 4], 'action', args[f + 3],
        'mode', args[f + 1], 'reservation', args[f + 2],
        'reason', type(done) == 'table' and tostring(done.err) or tostring(done),
        'at', args[f + 10], 'request_id', args[f + 11]})
      done = -1
    end
    local record = redis.call('HMGET', k[4], 'plan', 'anchor_day')
    results[#results + 1] = done
    results[#results + 1] = record[1]
    results[#results + 1] = record[2]
  end
  return results
end

-- plan_limits_settle: a batch as filters older than plan_limits_settle_v2 send it (kept so
-- that a rolling upgrade loses nothing): each item's eight keys named in `keys`, in item
-- order, and its 19 fields without their positions. Applied as plan_limits_settle_v2.
local function settle(keys, args)
  local stride = tonumber(args[8])
  local v2 = {unpack(args, 1, 12)}
  v2[8] = tostring(stride + 1)
  for i = 0, (#keys - 2) / 8 - 1 do
    for field = 1, stride do
      v2[#v2 + 1] = args[12 + stride * i + field]
    end
    local first = 3 + 8 * i
    v2[#v2 + 1] = table.concat({first, first + 1, first + 2, first + 3, first + 4, first + 5,
      first + 6, first + 7}, ' ')
  end
  return settle_v2(keys, v2)
end

-- The read side's replies are flat arrays: webdis renders nested ones as null.

-- plan_limits_usage: where a user stands this period, for the usage endpoint (reads only).
-- keys: summary, entitlement, storage and its held set, team and its held set, then each
--       action's pending set.
-- args: now (ms), then the actions (in the keys' order).
-- Returns {billing's plan or false, billing's anchor day or false, the period's recent uses
-- (JSON) or false, stored bytes, bytes held by uploads in flight, members invited, invites in
-- flight, then per action its count, its reservations in flight and the extra units granted}.
local function usage(keys, args)
  local now = tonumber(args[1])
  local out = redis.call('HMGET', keys[2], 'plan', 'anchor_day')
  out[3] = redis.call('HGET', keys[1], 'recent')
  for g = 3, 5, 2 do
    out[#out + 1] = tonumber(redis.call('GET', keys[g]) or '0')
    local held = 0
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', keys[g + 1], '(' .. now, '+inf')) do
      held = held + tonumber(string.match(member, '|(%d+)$') or '0')
    end
    out[#out + 1] = held
  end
  for i = 7, #keys do
    local action = args[i - 5]
    out[#out + 1] = tonumber(redis.call('HGET', keys[1], action) or '0')
    out[#out + 1] = redis.call('ZCOUNT', keys[i], '(' .. now, '+inf')
    out[#out + 1] = tonumber(redis.call('HGET', keys[1], 'grant:' .. action) or '0')
  end
  return out
end

-- plan_limits_period: a past period's summary, for the usage endpoint's `period` (reads only).
-- keys: the period's summary, billing's entitlement. args: the actions.
-- Returns {billing's plan, billing's anchor day, then the summary's plan, limits and
-- updated_at, then per action its count, grant and loss} (each false when absent).
local function period(keys, args)
  local out = redis.call('HMGET', keys[2], 'plan', 'anchor_day')
  local fields = {'plan', 'limits', 'updated_at'}
  for _, action in ipairs(args) do
    fields[#fields + 1] = action
    fields[#fields + 1] = 'grant:' .. action
    fields[#fields + 1] = 'lost:' .. action
  end
  for _, value in ipairs(redis.call('HMGET', keys[1], unpack(fields))) do
    out[#out + 1] = value
  end
  return out
end

-- plan_limits_history: daily counts, for the history endpoint (reads only).
-- keys: billing's entitlement, then one day's counters per day asked for.
-- args: the actions asked for.
-- Returns {billing's plan or false, then per day, per action, its count}.
local function history(keys, args)
  local out = {redis.call('HGET', keys[1], 'plan')}
  for i = 2, #keys do
    local counts = redis.call('HMGET', keys[i], unpack(args))
    for j = 1, #args do
      out[#out + 1] = tonumber(counts[j] or '0')
    end
  end
  return out
end

redis.register_function{function_name = 'plan_limits_reserve', callback = reserve}
redis.register_function{function_name = 'plan_limits_reserve_many', callback = reserve_many}
redis.register_function{function_name = 'plan_limits_settle', callback = settle}
redis.register_function{function_name = 'plan_limits_settle_v2', callback = settle_v2}
redis.register_function{function_name = 'plan_limits_usage', callback = usage,
  flags = {'no-writes'}}
redis.register_function{function_name = 'plan_limits_period', callback = period,
  flags = {'no-writes'}}
redis.register_function{function_name = 'plan_limits_history', callback = history,
  flags = {'no-writes'}}
