-- Reserve one unit of an action's monthly allowance, or refuse: committed units (the summary
-- counter) plus unexpired reservations count against the limit, so concurrent requests can
-- never take more than the limit between them.
-- KEYS: summary, pending.
-- ARGV: action, limit, reservation id, now (ms), expiry (ms), ttl (ms).
-- Scores use the filter's clock; the key's own expiry is relative, so a clock that differs
-- from Redis's cannot expire it early.
local summary, pending = KEYS[1], KEYS[2]
local action, limit, id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now, expires, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', pending, '-inf', now)
local committed = tonumber(redis.call('HGET', summary, action) or '0')
local held = redis.call('ZCARD', pending)
if committed + held >= limit then
  return {0, committed, held}
end
redis.call('ZADD', pending, expires, id)
redis.call('PEXPIRE', pending, ttl)
return {1, committed, held + 1}
