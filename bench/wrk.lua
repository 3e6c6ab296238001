-- wrk script for `make bench`: one request shape per case, from the environment:
-- BENCH_METHOD, BENCH_PATH, BENCH_HEADERS ("name: value|name: value"), BENCH_BODY.
local method = os.getenv("BENCH_METHOD") or "GET"
local path = os.getenv("BENCH_PATH") or "/"
local body = os.getenv("BENCH_BODY")
if body == "" then body = nil end
local headers = { ["Host"] = "gateway" }
for pair in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^|]+") do
  local name, value = string.match(pair, "^%s*([^:]+):%s*(.*)$")
  if name then headers[name] = value end
end
local req = wrk.format(method, path, headers, body)

request = function()
  return req
end
