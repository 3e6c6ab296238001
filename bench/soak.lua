-- wrk script for `make soak`: metered requests of 300 users on four routes and plans. Each
-- user's bearer tokens come from the file SOAK_TOKENS names (lines `user plan token`).
local routes = {
  { "POST", "/api/upload", "free" },
  { "POST", "/api/teammate", "professional" },
  { "GET", "/api/procedures/1", "free" },
  { "POST", "/api/export/pdf", "enterprise" },
}
local tokens = {}
for line in io.lines(os.getenv("SOAK_TOKENS")) do
  local user, plan, token = line:match("^(%S+) (%S+) (%S+)$")
  if user then tokens[user .. " " .. plan] = token end
end
local counter = 0

request = function()
  counter = counter + 1
  local r = routes[(counter % #routes) + 1]
  local user = "soak-" .. ((counter * 7919) % 300)
  local body = nil
  if r[1] == "POST" then body = "x" end
  local token = tokens[user .. " " .. r[3]]
  return wrk.format(r[1], r[2], { ["authorization"] = "Bearer " .. token }, body)
end
