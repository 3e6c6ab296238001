-- wrk script for `make soak`: metered requests of 300 users on four routes and plans.
local routes = {
  { "POST", "/api/upload", "free" },
  { "POST", "/api/teammate", "professional" },
  { "GET", "/api/procedures/1", "free" },
  { "POST", "/api/export/pdf", "enterprise" },
}
local counter = 0

request = function()
  counter = counter + 1
  local r = routes[(counter % #routes) + 1]
  local user = "soak-" .. ((counter * 7919) % 300)
  local body = nil
  if r[1] == "POST" then body = "x" end
  return wrk.format(r[1], r[2], { ["x-user-id"] = user, ["x-user-plan"] = r[3] }, body)
end
