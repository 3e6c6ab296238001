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
-- keys: summary, pending, entitlement, and the idempotency key's marker if there is one.
-- args: action, claimed plan, fallback plan, reservation id, now (ms), expiry (ms), ttl (ms),
--       the marker's lifetime (ms), then pairs of plan name and that plan's limit for the
--       action ('' = unlimited).
-- Returns {status, committed, pending, plan, named plan, recorded, granted, marker, anchor}:
-- status 1
-- granted, 0 refused (limit reached), 2 unlimited under that plan (nothing reserved), 3 the
-- plan is unknown (nothing reserved), 4 a duplicate (nothing reserved; marker is what the
-- first one's says); plan is the one applied, named plan the one the record or the claim
-- named; recorded 1 when billing's record named it; granted the extra units an operator gave
-- for the period (the limit checked is the plan's plus these); anchor the subscription's
-- anchor day billing recorded ('' if none).
-- Scores use the filter's clock; the key's own expiry is relative, so a clock that differs
-- from Redis's cannot expire it early.
local function reserve(keys, args)
  local summary, pending, entitlement = keys[1], keys[2], keys[3]
  local action, claimed, fallback, id = args[1], args[2], args[3], args[4]
  local now, expires, ttl = tonumber(args[5]), tonumber(args[6]), tonumber(args[7])
  local marker, marker_ttl = keys[4], tonumber(args[8])
  local function limit_of(plan)
    for i = 9, #args - 1, 2 do
      if args[i] == plan then
        return true, tonumber(args[i + 1])
      end
    end
    return false, nil
  end
  local record, anchor = unpack(redis.call('HMGET', entitlement, 'plan', 'anchor_day'))
  anchor = anchor or ''
  local named = record or claimed
  local recorded = record and 1 or 0
  local plan = named
  local known, limit = limit_of(plan)
  if not known and fallback ~= '' then
    plan = fallback
    known, limit = limit_of(plan)
  end
  redis.call('ZREMRANGEBYSCORE', pending, '-inf', now)
  local committed = tonumber(redis.call('HGET', summary, action) or '0')
  local held = redis.call('ZCARD', pending)
  -- Extra units an operator granted for the period (`plan-limits grant`).
  local granted = tonumber(redis.call('HGET', summary, 'grant:' .. action) or '0')
  if not known then
    return {3, committed, held, plan, named, recorded, granted, '', anchor}
  end
  if marker then
    -- (A reservation asked again under the same id, in another period, is not its own repeat.)
    local first = redis.call('GET', marker)
    if first and first ~= 'pending:' .. id then
      return {4, committed, held, plan, named, recorded, granted, first, anchor}
    end
  end
  if limit == nil then
    if marker then
      redis.call('SET', marker, 'pending:' .. id, 'PX', marker_ttl)
    end
    return {2, committed, held, plan, named, recorded, granted, '', anchor}
  end
  if committed + held >= limit + granted then
    return {0, committed, held, plan, named, recorded, granted, '', anchor}
  end
  redis.call('ZADD', pending, expires, id)
  redis.call('PEXPIRE', pending, ttl)
  if marker then
    redis.call('SET', marker, 'pending:' .. id, 'PX', marker_ttl)
  end
  return {1, committed, held + 1, plan, named, recorded, granted, '', anchor}
end

-- plan_limits_settle: a batch of settlements, each one of
--   commit  - the upstream succeeded: the reservation becomes a count. Counted once: a commit
--             sent again (its first answer was lost) finds its id among the recent commits.
--             A commit whose reservation already expired (Redis unreachable for longer than
--             the reservation's expiry) still counts: the success happened;
--   count   - a success that had no reservation (unlimited plan, or Redis was down): count it;
--   release - the upstream failed or the client left: drop the reservation;
--   extend  - the request is still in flight: push its reservation's expiry back.
-- Every count also updates the monthly summary and the day's counters (the history) and
-- appends a usage event; a count that brings the period's to a warning threshold (a share of
-- the plan's limit plus grants) appends one `threshold_crossed` event, once per user, action,
-- period and threshold (marked in the summary).
-- A request sent with an idempotency key marks it 'done:<time>' when counted, and deletes
-- the marker its reservation set when released (a retry is then a new request).
-- keys: events stream, then per item: summary, pending, commits (recent commit ids),
--       entitlement, the day's counters, the idempotency key's marker (any key of the
--       user's without one).
-- args: how the stream is trimmed ('' keep all, 'MAXLEN' to about a length, 'MINID' of
--       events older than an age in ms, by Redis's clock, which names the events) and its
--       threshold, now (ms), reservation ttl (ms), how long
--       commit ids are remembered (ms), how long days are kept (ms), the warning thresholds
--       (percent, comma-separated), fields per item, then the items' fields.
-- Returns per item {counted or extended (1/0), the user's entitled plan or false, the anchor
-- day billing recorded or false}, flattened.
local function settle(keys, args)
  local trim, threshold, now, ttl = args[1], args[2], tonumber(args[3]), tonumber(args[4])
  local remember, keep_days = tonumber(args[5]), tonumber(args[6])
  local thresholds, stride = {}, tonumber(args[8])
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
  local results = {}
  -- A batch often holds many settlements of one user: the summary's plan, limits and expiry
  -- are written once per summary.
  local written = {}
  for i = 0, (#keys - 1) / 6 - 1 do
    local summary, pending = keys[2 + 6 * i], keys[3 + 6 * i]
    local commits, entitlement, day = keys[4 + 6 * i], keys[5 + 6 * i], keys[6 + 6 * i]
    local marker = keys[7 + 6 * i]
    local f = 8 + stride * i
    local mode, id, action, user = args[f + 1], args[f + 2], args[f + 3], args[f + 4]
    local plan, limits, kind, bytes = args[f + 5], args[f + 6], args[f + 7], args[f + 8]
    local status, at, request_id, period = args[f + 9], args[f + 10], args[f + 11], args[f + 12]
    local keep_for, idempotency_key = args[f + 13], args[f + 14]
    local done = 0
    if mode == 'extend' then
      if redis.call('ZSCORE', pending, id) then
        redis.call('ZADD', pending, 'XX', now + ttl, id)
        redis.call('PEXPIRE', pending, ttl)
        done = 1
      end
    else
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
      if counts then
        local count = redis.call('HINCRBY', summary, action, 1)
        redis.call('HINCRBY', day, action, 1)
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
        append({'event', 'usage', 'user', user, 'action', action, 'kind', kind, 'bytes', bytes,
          'status', status, 'at', at, 'request_id', request_id, 'plan', plan, 'period', period,
          'idempotency_key', idempotency_key})
        local limit = cjson.decode(limits)[action]
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
        done = 1
      end
    end
    local record = redis.call('HMGET', entitlement, 'plan', 'anchor_day')
    results[3 * i + 1] = done
    results[3 * i + 2] = record[1]
    results[3 * i + 3] = record[2]
  end
  return results
end

-- The read side's replies are flat arrays: webdis renders nested ones as null.

-- plan_limits_usage: where a user stands this period, for the usage endpoint (reads only).
-- keys: summary, entitlement, then each action's pending set.
-- args: now (ms), then the actions (in the keys' order).
-- Returns {billing's plan or false, billing's anchor day or false, then per action its count,
-- its reservations in flight and the extra units granted}.
local function usage(keys, args)
  local now = tonumber(args[1])
  local out = redis.call('HMGET', keys[2], 'plan', 'anchor_day')
  for i = 3, #keys do
    local action = args[i - 1]
    out[#out + 1] = tonumber(redis.call('HGET', keys[1], action) or '0')
    out[#out + 1] = redis.call('ZCOUNT', keys[i], '(' .. now, '+inf')
    out[#out + 1] = tonumber(redis.call('HGET', keys[1], 'grant:' .. action) or '0')
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
redis.register_function{function_name = 'plan_limits_settle', callback = settle}
redis.register_function{function_name = 'plan_limits_usage', callback = usage,
  flags = {'no-writes'}}
redis.register_function{function_name = 'plan_limits_history', callback = history,
  flags = {'no-writes'}}
