-- Registers a live replica and lists the live ones.
-- KEYS[1] replicas (zset: score = last beat ms); ARGV[1] replica id,
-- ARGV[2] ttl ms, ARGV[3] now (tests only). Returns {now, id, id, ...}.
local now = clock(ARGV[3])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local out = {now}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = id
end
return out
