-- Reserves one grant in a key's rolling window, atomically.
-- KEYS[1] grants (zset: score = grant time ms), KEYS[2] emergency grants,
-- KEYS[3] state (hash: until, upstream_until, health, effective).
-- ARGV[1] window ms, ARGV[2] limit, ARGV[3] member (unique per grant),
-- ARGV[4] '1' for an emergency probe, ARGV[5] emergency limit, ARGV[6] now
-- (tests only), ARGV[7] replicas whose shares stay free (cut off, or just
-- back), ARGV[8] replicas counted. Returns {granted, code, at, now}:
--   {1, used after, now, now}  granted
--   {0, 1, free_at, now}       window full until free_at
--   {0, 2, until, now}         cooling until
--   {0, 3, floor, now}         probe not before floor (upstream Retry-After)
--   {0, 4, 0, now}             key rejected or down
--   {0, 5, free_at, now}       emergency trickle spent until free_at
local now = clock(ARGV[6])
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[3], 'until', 'upstream_until', 'health', 'effective')
if s[3] == 'error' or s[3] == 'down' then
  return {0, 4, 0, now}
end
local effective = tonumber(s[4])
if effective and effective > 0 and effective < limit then
  limit = effective
end
-- The shares of replicas that may serve without Redis stay free for them
-- (each at most ceil(limit / counted)).
local missing = tonumber(ARGV[7]) or 0
local counted = tonumber(ARGV[8]) or 1
if missing > 0 and counted > 0 then
  limit = limit - missing * math.ceil(limit / counted)
end
if limit < 1 then
  return {0, 1, now + window, now}
end
local cooling = tonumber(s[1]) or 0
local emergency = ARGV[4] == '1'
if cooling > now then
  if not emergency then
    return {0, 2, cooling, now}
  end
  local floor = tonumber(s[2]) or cooling
  if floor > now then
    return {0, 3, floor, now}
  end
end
-- Age >= window has left the window.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
if used >= limit then
  local k = used - limit
  local at = redis.call('ZRANGE', KEYS[1], k, k, 'WITHSCORES')
  return {0, 1, tonumber(at[2]) + window, now}
end
if emergency and cooling > now then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  local e = redis.call('ZCARD', KEYS[2])
  local elimit = tonumber(ARGV[5])
  if e >= elimit then
    local k = e - elimit
    local at = redis.call('ZRANGE', KEYS[2], k, k, 'WITHSCORES')
    return {0, 5, tonumber(at[2]) + window, now}
  end
  redis.call('ZADD', KEYS[2], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[2], window * 2)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window * 2)
return {1, used + 1, now, now}
