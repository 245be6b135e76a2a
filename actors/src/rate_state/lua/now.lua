-- The Redis server's clock in milliseconds, so replicas with skewed clocks
-- agree; tests pass a fixed time as the last argument instead.
local function clock(override)
  if override and override ~= '' then
    return tonumber(override)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
