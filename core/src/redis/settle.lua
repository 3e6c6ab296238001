-- Settle a batch of metered requests once their upstream answered (or never will):
--   commit  - the upstream succeeded: turn the reservation into a count, if it is still held
--             (so a retried commit, or one for a reservation that expired, counts nothing);
--   count   - a success that had no reservation (unlimited plan, or Redis was down): count it;
--   release - the upstream failed or the client left: drop the reservation.
-- Every count also updates the monthly summary and appends a usage event.
-- KEYS: events stream, then per item: summary, pending.
-- ARGV: stream max length ('' = keep all), fields per item, then the items' fields.
local maxlen, stride = ARGV[1], tonumber(ARGV[2])
local results = {}
-- A batch often holds many settlements of one user: the summary's plan, limits and expiry
-- are written once per summary.
local written = {}
for i = 0, (#KEYS - 1) / 2 - 1 do
  local summary, pending = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local f = 2 + stride * i
  local mode, id, action, user = ARGV[f + 1], ARGV[f + 2], ARGV[f + 3], ARGV[f + 4]
  local plan, limits, kind, bytes = ARGV[f + 5], ARGV[f + 6], ARGV[f + 7], ARGV[f + 8]
  local status, at, request_id, period = ARGV[f + 9], ARGV[f + 10], ARGV[f + 11], ARGV[f + 12]
  local keep_for = ARGV[f + 13]
  local held = 0
  if id ~= '' then
    held = redis.call('ZREM', pending, id)
  end
  local counted = 0
  if mode == 'count' or (mode == 'commit' and held == 1) then
    redis.call('HINCRBY', summary, action, 1)
    if not written[summary] then
      redis.call('HSET', summary, 'plan', plan, 'limits', limits, 'updated_at', at)
      redis.call('PEXPIRE', summary, keep_for)
      written[summary] = true
    end
    local event = {'user', user, 'action', action, 'kind', kind, 'bytes', bytes,
      'status', status, 'at', at, 'request_id', request_id, 'plan', plan, 'period', period}
    if maxlen == '' then
      redis.call('XADD', KEYS[1], '*', unpack(event))
    else
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(event))
    end
    counted = 1
  end
  results[i + 1] = counted
end
return results
