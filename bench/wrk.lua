-- wrk script for `make bench`: one request shape per case, from the environment:
-- BENCH_METHOD, BENCH_PATH, BENCH_HEADERS ("name: value|name: value"), BENCH_BODY_FILE (the
-- body, read once), BENCH_TOKENS_FILE (one bearer token per line: requests go round-robin
-- over those callers, replacing the case's own).
local method = os.getenv("BENCH_METHOD") or "GET"
local path = os.getenv("BENCH_PATH") or "/"
local body = nil
local body_file = os.getenv("BENCH_BODY_FILE")
if body_file and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  body = f:read("*a")
  f:close()
end
local headers = { ["Host"] = "gateway" }
for pair in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^|]+") do
  local name, value = string.match(pair, "^%s*([^:]+):%s*(.*)$")
  if name then headers[name] = value end
end

local requests = {}
local tokens_file = os.getenv("BENCH_TOKENS_FILE")
if tokens_file and tokens_file ~= "" then
  headers["authorization"] = nil
  for token in io.lines(tokens_file) do
    headers["authorization"] = "Bearer " .. token
    requests[#requests + 1] = wrk.format(method, path, headers, body)
  end
else
  requests[1] = wrk.format(method, path, headers, body)
end

local next_request = 0
request = function()
  next_request = next_request % #requests + 1
  return requests[next_request]
end
