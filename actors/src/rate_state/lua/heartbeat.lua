-- Registers a live replica and counts the live ones.
-- KEYS[1] replicas (zset: score = last beat ms); ARGV[1] replica id,
-- ARGV[2] ttl ms, ARGV[3] now (tests only). Returns {alive, now}.
local now = clock(ARGV[3])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return {redis.call('ZCARD', KEYS[1]), now}
