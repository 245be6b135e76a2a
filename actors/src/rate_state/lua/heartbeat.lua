-- Registers a live replica and lists the live ones, and the ones that came
-- back from an outage lately (their grants made meanwhile may not be in the
-- shared window yet, so the others keep their shares free).
-- KEYS[1] replicas (zset: score = last beat ms), KEYS[2] returning (zset:
-- score = when it came back); ARGV[1] replica id, ARGV[2] ttl ms, ARGV[3]
-- now (tests only), ARGV[4] '1' when this replica is coming back, ARGV[5]
-- hold ms. Returns {now, returning count (others), id, id, ...}.
local now = clock(ARGV[3])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[2], now, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[5]))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[5]) * 2)
local returning = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if id ~= ARGV[1] then
    returning = returning + 1
  end
end
local out = {now, returning}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = id
end
return out
